"""Image-only rewards: cheap, deterministic, and improvable from random images, so a
tiny model on the CPU can show that training raises them."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from common.config import RewardConfig
from services.reward.base import ScoreOutput, Scorer


def jpeg_size_kb(image: np.ndarray) -> float:
    """Size of the image saved as JPEG at quality 95, in kB (1 kB = 1000 bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


class JpegCompressibility(Scorer):
    """reward = -size_kB / 500 of the image as a quality-95 JPEG (the paper's code):
    smoother, simpler images compress better and score higher."""

    name = "jpeg_compressibility"

    def __init__(self, config: RewardConfig):
        self.engine = f"pillow-{Image.__version__}-jpeg-q95"

    def _score(self, images, prompts, metadata):
        sizes = [jpeg_size_kb(image) for image in images]
        return ScoreOutput(scores=-np.asarray(sizes) / 500, details=[{"jpeg_kb": s} for s in sizes])


class Brightness(Scorer):
    """reward = mean pixel value scaled to [0, 1] (0 black, 1 white)."""

    name = "brightness"

    def __init__(self, config: RewardConfig):
        self.engine = "numpy-mean"

    def _score(self, images, prompts, metadata):
        scores = np.array([image.mean(dtype=np.float64) / 255.0 for image in images])
        return ScoreOutput(scores=scores, details=[{} for _ in images])
