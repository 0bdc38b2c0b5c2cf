"""PickScore on a tiny random CLIPModel + CLIPProcessor saved offline and loaded by the
production loader, against a direct computation of logit_scale.exp() * cos / 26."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from common.config import PickScoreConfig, RewardConfig
from services.reward.pickscore import PickScoreScorer
from services.reward.scorers import build_scorer
from tests.helpers.tiny_rewards import make_tiny_clip

PROMPTS = ["a photo of a red cat", "a green dog", "a blue bowl on a dining table"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    path = str(make_tiny_clip(tmp_path_factory.mktemp("pickscore") / "clip", seed=1))
    config = RewardConfig(weights={"pickscore": 1.0},
                          pickscore=PickScoreConfig(processor=path, model=path, device="cpu"))
    return build_scorer("pickscore", config)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)


def direct(scorer, images, prompts):
    """Normalised projections of each tower, their cosine times exp(logit_scale), / 26."""
    model = scorer.model
    pixels = scorer.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    text = scorer.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_emb = model.text_projection(model.text_model(**text).pooler_output)
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (image_emb * text_emb).sum(-1) / 26).detach().numpy()


def test_formula_matches_a_direct_computation(scorer, images):
    assert isinstance(scorer, PickScoreScorer) and isinstance(scorer.model, CLIPModel)
    out = scorer.score(images, PROMPTS, [{}] * 3)
    np.testing.assert_allclose(out.scores, direct(scorer, images, PROMPTS), rtol=1e-5, atol=1e-6)
    assert len(set(out.scores.round(6))) == 3  # pairs are scored text i with image i, not all alike


def test_score_of_a_pair_does_not_depend_on_the_batch(scorer, images):
    alone = scorer.score(images[1:2], PROMPTS[1:2], [{}]).scores[0]
    together = scorer.score(images, PROMPTS, [{}] * 3).scores[1]
    assert alone == pytest.approx(together, rel=1e-5)


def test_pil_images_score_like_arrays(scorer, images):
    pil = [Image.fromarray(im) for im in images]
    np.testing.assert_allclose(scorer.score(pil, PROMPTS, [{}] * 3).scores,
                               scorer.score(images, PROMPTS, [{}] * 3).scores)
