"""PickScore (Kirstain et al. 2023) as Flow-GRPO's preference reward.

    reward = logit_scale.exp() * cos(image_emb, text_emb) / 26

with the CLIP-H processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K and the model
yuvalkirstain/PickScore_v1 (a CLIPModel), in float32; the division by 26 is the
paper's code's rescaling towards [0, 1]. CLIPModel's `logits_per_text` is exactly
logit_scale.exp() times the cosine of the normalised projections, so its diagonal
(text i against image i) is the score; this also holds in transformers 5, where the
get_*_features helpers no longer return plain tensors. Images go to the processor as
PIL RGB; prompts are truncated to CLIP's 77 tokens.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from common.config import RewardConfig
from services.reward.base import ScoreOutput, Scorer, ScorerNeeds

SCALE = 26.0


class PickScoreScorer(Scorer):
    name = "pickscore"

    def __init__(self, config: RewardConfig):
        import torch
        from transformers import AutoModel, AutoProcessor
        from common.models import resolve_device
        cfg = config.pickscore
        self._torch = torch
        self.device = resolve_device(cfg.device)
        self.processor = AutoProcessor.from_pretrained(cfg.processor)
        self.model = AutoModel.from_pretrained(cfg.model).eval().to(self.device, dtype=torch.float32)
        self.engine = f"transformers-clip:{cfg.model}:{self.device.type}"

    @classmethod
    def needs(cls, config: RewardConfig) -> ScorerNeeds:
        return cls.model_needs(config, config.pickscore.device)

    def _score(self, images, prompts, metadata):
        pixels = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with self._torch.no_grad():
            out = self.model(input_ids=text["input_ids"].to(self.device),
                             attention_mask=text["attention_mask"].to(self.device),
                             pixel_values=pixels.to(self.device))
        scores = out.logits_per_text.diagonal().float().cpu().numpy() / SCALE
        return ScoreOutput(scores=scores.astype(np.float64), details=[{} for _ in images])
