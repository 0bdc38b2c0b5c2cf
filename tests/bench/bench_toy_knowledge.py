"""Benchmark: what a toy-world model knows of each prompt's composition, beside what its
pretraining captions taught.

    .venv/bin/python tests/bench/bench_toy_knowledge.py [--model common/toy_model]
        [--prompts deploy/prompts/toy_geneval_test.jsonl] [--images 16] [--cfg 4.5 1.0]
        [--lora RUN_DIR/lora]

Why: Flow-GRPO sharpens choices a model already makes sometimes; it can raise a tag on
prompts it never trained on only through what the model knows of the words. GenEval's
0/1 mixes several things (were the objects drawn at all, how many, which colour, where),
so this separates them, on ODE samples (sample_ode, 20 steps, fixed initial noise) read by
the toy detector:

  - position: of the images with exactly one object of each named class, the share in
    which the asked relation holds ("asked"), against each other relation and none;
  - colour attribution: of the images with one object of each class, both colours
    right, swapped, or other;
  - colours: of the images with objects of the class, the share whose first is the
    named colour;
  - counting: objects of the class drawn minus asked.

Each accuracy line ends with what the model's pretraining captions of the tag showed:
the share of its scenes that matched their caption (1 - the miscaption rate its
flowgrpo_toy.json records; `caption_match`). At --cfg 1.0 the
sampler draws from the model's own conditional distribution, so a share near the
captions' means the model learned the tag and one near chance (about a quarter of the
relations, half of the bindings) means it did not; guidance (4.5) sharpens what was
learned, it cannot add what was not.

Not part of the test suite: measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.denoising import encode_prompts, sigma_schedule  # noqa: E402
from common.models import Precision, load_pipeline  # noqa: E402
from common.prompts import GENEVAL_TAGS, load_prompts  # noqa: E402
from common.toy_pretrain import MARKER, MAX_SEQUENCE_LENGTH  # noqa: E402
from common.toy_world import LATENT, MISCAPTION_RATE  # noqa: E402
from services.controller.preflight import REPO_ROOT  # noqa: E402
from services.reward.geneval_rules import evaluate, keep, relative_position  # noqa: E402
from services.reward.toy_detector import ToyDetector  # noqa: E402
from services.rollout.sampler import initial_noise, sample_ode  # noqa: E402

def composition(metadata, kept) -> tuple[str, str] | None:
    """(table, outcome) of one image for the tag's knowledge table (module doc), or None
    where the image does not qualify."""
    tag, include = metadata["tag"], metadata["include"]
    found = [kept.get(clause["class"], []) for clause in include]
    if tag == "position" and all(len(f) == 1 for f in found):
        relations = relative_position(found[1][0], found[0][0])   # the target's to the reference's
        asked = include[1]["position"][0]
        return "relation", "asked" if asked in relations else ("+".join(sorted(relations)) or "none")
    if tag == "color_attr" and all(len(f) == 1 for f in found):
        drawn = (found[0][0].color, found[1][0].color)
        wanted = (include[0]["color"], include[1]["color"])
        return "binding", "right" if drawn == wanted else "swapped" if drawn == wanted[::-1] else "other"
    if tag == "colors" and found[0]:
        return "colour", "named" if found[0][0].color == include[0]["color"] else "other"
    if tag == "counting":
        return "count drawn - asked", f"{len(found[0]) - include[0]['count']:+d}"
    return None


def caption_match(model: str) -> dict[str, float]:
    """Per tag, the share of the model's pretraining scenes that matched their caption:
    1 - the miscaption rates its MARKER records (models pretrained before it recorded
    them: common.toy_world.MISCAPTION_RATE, with which the shipped model was made)."""
    marker = Path(model) / MARKER
    rates = json.loads(marker.read_text()).get("miscaption_rate") if marker.exists() else None
    return {tag: 1 - rate for tag, rate in (rates or MISCAPTION_RATE).items()}


def measure(pipe, records, images: int, cfg: float, matched: dict[str, float], steps: int = 20) -> None:
    detector = ToyDetector()
    timesteps, sigmas = sigma_schedule(pipe.scheduler, steps, pipe.transformer.device)
    uncond = encode_prompts(pipe, [""], MAX_SEQUENCE_LENGTH).expand(images)
    generator = torch.Generator().manual_seed(0)
    resolution = LATENT * pipe.vae_scale_factor   # the world's sub-cell grid, decoded
    correct: dict[str, list[bool]] = defaultdict(list)
    tables: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        metadata = record.metadata
        cond = encode_prompts(pipe, [record.prompt] * images, MAX_SEQUENCE_LENGTH)
        noise = initial_noise(pipe, images, resolution, generator)
        batch = sample_ode(pipe, cond, uncond, timesteps, sigmas, noise, guidance_scale=cfg)
        for detections in detector.detect(list(batch)):
            correct[metadata["tag"]].append(evaluate(metadata, detections).correct)
            entry = composition(metadata, keep(detections, metadata["tag"]))
            if entry:
                tables[f"{metadata['tag']}: {entry[0]}"][entry[1]] += 1
    print(f"\nCFG {cfg}: {images} ODE images a prompt, {len(records)} prompts")
    tags = [t for t in GENEVAL_TAGS if t in correct]
    for tag in tags:
        print(f"  {tag:14s} GenEval accuracy {np.mean(correct[tag]):.2f}   "
              f"(pretraining captions matched their scene {matched[tag]:.2f})")
    print(f"  overall {np.mean([np.mean(correct[t]) for t in tags]):.3f}")
    for name, counts in sorted(tables.items()):
        total = sum(counts.values())
        shares = ", ".join(f"{k} {v / total:.2f}" for k, v in counts.most_common())
        print(f"  {name} ({total} images): {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "common" / "toy_model"))
    parser.add_argument("--prompts", default=str(REPO_ROOT / "deploy" / "prompts" / "toy_geneval_test.jsonl"))
    parser.add_argument("--images", type=int, default=16, help="ODE images a prompt")
    parser.add_argument("--cfg", type=float, nargs="+", default=[4.5, 1.0])
    parser.add_argument("--lora", default=None, help="a LoRA folder (a run's lora/) to load onto the model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    pipe = load_pipeline(args.model, Precision.resolve("fp32", device), device)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    records = load_prompts(args.prompts, "geneval")
    matched = caption_match(args.model)
    for cfg in args.cfg:
        measure(pipe, records, args.images, cfg, matched)


if __name__ == "__main__":
    main()
