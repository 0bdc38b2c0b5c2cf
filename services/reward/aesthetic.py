"""The LAION aesthetic predictor, the quality score the paper watched for reward hacking.

    embedding = CLIP ViT-L/14 image embedding / its L2 norm
    score     = head(embedding)        about 1 (poor) to 10 (beautiful)

with head the predictor's MLP (christophschuhmann/improved-aesthetic-predictor, used by
the paper's flow_grpo/aesthetic_scorer.py):

    Linear(768, 1024) - Dropout(0.2) - Linear(1024, 128) - Dropout(0.2) - Linear(128, 64)
    - Dropout(0.1) - Linear(64, 16) - Linear(16, 1)

no activations between the layers (as released), run in eval mode (dropout off), in
float32. The CLIP model (reward.aesthetic.clip, hub id or local path) loads through
transformers; the head's weights (reward.aesthetic.head) are the released state dict
file sac+logos+ava1-l14-linearMSE.pth, whose keys are layers.0 ... layers.7. The
embedding width is read from the file and must be CLIP's projection width (768 for
ViT-L/14). Images go to the CLIP processor as PIL RGB.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.config import RewardConfig
from services.reward.base import ScoreOutput, Scorer, ScorerNeeds
from services.reward.geneval import clip_embeds


def aesthetic_head(embed_dim: int = 768):
    """The predictor's MLP (module doc), untrained; `head.layers` is the released layout."""
    from torch import nn
    return nn.ModuleDict({"layers": nn.Sequential(
        nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))})


def load_head(path: str | None):
    """The head with the weights of the state dict file at `path`."""
    import torch
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"reward.aesthetic.head: {path} is not a file; give the predictor's MLP weights "
                                f"(sac+logos+ava1-l14-linearMSE.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = aesthetic_head(embed_dim=state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.eval()


class AestheticScorer(Scorer):
    name = "aesthetic"

    def __init__(self, config: RewardConfig):
        import torch
        from transformers import AutoProcessor, CLIPModel
        from common.models import resolve_device
        cfg = config.aesthetic
        self._torch = torch
        self.device = resolve_device(cfg.device)
        self.head = load_head(cfg.head).to(self.device, dtype=torch.float32)  # first: the cheap file check
        self.processor = AutoProcessor.from_pretrained(cfg.clip)
        self.clip = CLIPModel.from_pretrained(cfg.clip).eval().to(self.device, dtype=torch.float32)
        width, clip_width = self.head["layers"][0].in_features, self.clip.config.projection_dim
        if width != clip_width:
            raise ValueError(f"reward.aesthetic.head takes {width}-wide embeddings but reward.aesthetic.clip "
                             f"gives {clip_width}; use the head trained on that CLIP (ViT-L/14: 768)")
        self.engine = f"transformers-clip:{cfg.clip}+laion-aesthetic:{Path(cfg.head).name}:{self.device.type}"

    @classmethod
    def needs(cls, config: RewardConfig) -> ScorerNeeds:
        return cls.model_needs(config, config.aesthetic.device)

    def _score(self, images, prompts, metadata):
        pixels = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
        with self._torch.no_grad():
            embeds = clip_embeds(self.clip.get_image_features(pixel_values=pixels.to(self.device)))
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            scores = self.head["layers"](embeds).squeeze(1)
        return ScoreOutput(scores=scores.cpu().numpy().astype(np.float64), details=[{} for _ in images])
