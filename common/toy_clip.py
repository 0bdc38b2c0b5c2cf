"""Contrastive pretraining of the toy pipeline's CLIP text encoders, CLIP's own objective
on the toy world's scenes, before the transformer learns to draw (common.toy_pretrain).

Why: SD3.5's CLIP encoders come pretrained; random ones are a poor stand-in. Their
pooled output (the transformer's adaLN conditioning) is close to a bag of words: "a dot
left of a pole" and "a pole left of a dot" came out at cosine 0.986, "a red block and a
blue bar" and its colours swapped at 0.993. With it the transformer never learned which
colour is whose (binding right 0.39, swapped 0.39 at CFG 1.0). Given instead a pooled
vector that names each clause's class and colour, it learned binding in the same 3000
steps (right 0.97, swapped 0.03; docs/toy_world.md). Training the encoders as CLIP
is trained gives them such a pooled vector: each scene must pick out its caption from
captions of the same tag that are false of it, "a blue block and a red bar" against
"a red block and a blue bar" included.

The objective: a small scene tower (a linear map of each cell's one-hot colours, then
an MLP over the 16 cells in place, so that where things are counts) and a CLIP text
tower (CLIPTextModelWithProjection, its `text_embeds`) embed a batch of scenes and all
prompts of the world; for each scene the loss is the cross-entropy of its caption among
the candidates: its caption and every prompt of its tag that is false of it (`confusers`);
logits = exp(s) cos(scene, prompt) with a learned temperature s, as CLIP's. Prompts of
other tags are left out: many are true of a scene of this one ("a photo of a dot" of a
scene of "a red dot"), and CLIP's in-batch negatives would make them false.

Each of the two CLIP encoders is trained alone, with its own scene tower and seed
(SD3's two CLIPs are two models); T5 stays random and frozen.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common.toy_world import GRID, PALETTE, SUB, all_prompts, cell_colors, sample_scene

_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def truth_key(metadata: Mapping[str, Any]) -> tuple:
    """What a prompt says of a scene, independent of its wording: the clauses as a set,
    and for position the relation read from the first-named class (so "a dot left of a
    pole" and "a pole right of a dot" have one key)."""
    if metadata["tag"] == "position":
        reference, target = metadata["include"]
        relation = target["position"][0]
        pair = sorted([(target["class"], relation, reference["class"]),
                       (reference["class"], _INVERSE[relation], target["class"])])
        return ("position", pair[0])
    clauses = frozenset((c["class"], c["count"], c.get("color")) for c in metadata["include"])
    return (metadata["tag"], clauses)


def confusers(prompts: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """[P, P] bool: candidates[i, j] when prompt j is prompt i or is of its tag and false of
    every scene of prompt i (another truth_key; within a tag of this world that means
    another class, count, colour or relation, or the colours or places swapped)."""
    keys = _codes([truth_key(p) for p in prompts])
    tags = _codes([p["tag"] for p in prompts])
    same_tag, same_key = tags[:, None] == tags[None, :], keys[:, None] == keys[None, :]
    return torch.eye(len(prompts), dtype=torch.bool) | (same_tag & ~same_key)


def _codes(values: list) -> torch.Tensor:
    """An integer per value, equal for equal values."""
    index: dict = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values])


class SceneTower(nn.Module):
    """Scene embedding: per cell, a linear map of its sub-cells' one-hot colours (class
    and colour of the object there), then an MLP over all cells in place."""

    def __init__(self, dim: int, width: int = 64, hidden: int = 256):
        super().__init__()
        colors = 1 + len(PALETTE)
        self.cell = nn.Conv2d(colors, width, kernel_size=SUB, stride=SUB)
        self.mlp = nn.Sequential(nn.GELU(), nn.Flatten(), nn.Linear(width * GRID * GRID, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        one_hot = nn.functional.one_hot(cells, 1 + len(PALETTE)).permute(0, 3, 1, 2).float()
        return self.mlp(self.cell(one_hot))


def train_clip_encoder(text_encoder, tokenizer, seed: int, steps: int = 3000, batch_size: int = 128,
                       learning_rate: float = 3e-3, eval_scenes: int = 1024, progress: str = "") -> dict[str, float]:
    """Train one CLIPTextModelWithProjection in place (module doc); returns the share of
    fresh scenes (per tag) whose caption scores above every one of its confusers.
    `progress`: a progress bar's label ("" for none)."""
    from tqdm import tqdm

    prompts = all_prompts()
    tokens = tokenizer([p["prompt"] for p in prompts], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    candidates = confusers(prompts)
    by_tag: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_tag.setdefault(p["tag"], []).append(i)
    groups = list(by_tag.values())

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tower = SceneTower(text_encoder.config.projection_dim)
    log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    text_encoder.train().requires_grad_(True)
    params = [*text_encoder.parameters(), *tower.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt indices (a tag uniformly, then a prompt of it) and a scene of each."""
        index = [group[int(rng.integers(len(group)))] for group in
                 (groups[int(rng.integers(len(groups)))] for _ in range(n))]
        cells = np.stack([cell_colors(sample_scene(prompts[i], rng)) for i in index])
        return torch.tensor(index), torch.from_numpy(cells)

    def logits(index: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        text = nn.functional.normalize(text_encoder(input_ids=tokens).text_embeds, dim=-1)
        scene = nn.functional.normalize(tower(cells), dim=-1)
        scores = log_scale.exp().clamp(max=100.0) * scene @ text.T
        return scores.masked_fill(~candidates[index], float("-inf"))

    for _ in tqdm(range(steps), desc=progress, disable=not progress, mininterval=2.0):
        index, cells = batch(batch_size)
        loss = nn.functional.cross_entropy(logits(index, cells), index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        index, cells = batch(eval_scenes)
        right = (logits(index, cells).argmax(dim=1) == index).numpy()
    tags = np.array([prompts[i]["tag"] for i in index.tolist()])
    return {tag: float(right[tags == tag].mean()) for tag in by_tag}
