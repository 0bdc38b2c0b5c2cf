"""Image-only rewards: JPEG compressibility (the paper's -kB/500 at quality 95) and brightness."""
import io

import numpy as np
import pytest
from PIL import Image

from common.config import RewardConfig
from services.reward.image_rewards import Brightness, JpegCompressibility

NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
FLAT = np.full((64, 64, 3), 128, np.uint8)


def test_jpeg_compressibility_is_minus_kilobytes_over_500():
    buffer = io.BytesIO()
    Image.fromarray(NOISE).save(buffer, format="JPEG", quality=95)
    out = JpegCompressibility(RewardConfig()).score([NOISE, FLAT], ["", ""], [{}, {}])
    assert out.scores[0] == pytest.approx(-len(buffer.getvalue()) / 1000 / 500)
    assert out.scores[1] > out.scores[0]  # a flat image compresses better than noise
    assert out.details[0]["jpeg_kb"] == pytest.approx(len(buffer.getvalue()) / 1000)


def test_brightness_is_the_mean_pixel_in_unit_range():
    black, white = np.zeros_like(FLAT), np.full_like(FLAT, 255)
    out = Brightness(RewardConfig()).score(np.stack([black, FLAT, white]), ["", "", ""], [{}, {}, {}])
    assert out.scores.tolist() == pytest.approx([0.0, 128 / 255, 1.0])


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="uint8 RGB"):
        Brightness(RewardConfig()).score([FLAT.astype(np.float32)], [""], [{}])
    with pytest.raises(ValueError, match="must be equal"):
        Brightness(RewardConfig()).score([FLAT, FLAT], [""], [{}, {}])
