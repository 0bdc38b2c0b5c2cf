"""The LAION aesthetic predictor on a tiny random CLIPModel and a random head of the
released layout, saved offline and loaded by the production loader, against a direct
computation: head(normalised CLIP image embedding)."""
import numpy as np
import pytest
import torch
from PIL import Image

from common.config import AestheticConfig, RewardConfig
from services.reward.aesthetic import AestheticScorer, aesthetic_head
from services.reward.scorers import build_scorer
from tests.helpers.tiny_rewards import make_tiny_aesthetic_head, make_tiny_clip

# the released file's keys: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
RELEASED_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    return str(make_tiny_clip(root / "clip", seed=2)), str(make_tiny_aesthetic_head(root / "head.pth", 16, seed=3))


@pytest.fixture(scope="module")
def scorer(files):
    clip, head = files
    return build_scorer("aesthetic", RewardConfig(weights={"aesthetic": 1.0},
                                                  aesthetic=AestheticConfig(clip=clip, head=head, device="cpu")))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)


def test_head_has_the_released_layout():
    head = aesthetic_head()
    assert list(head.state_dict()) == RELEASED_KEYS
    widths = [(m.in_features, m.out_features) for m in head["layers"] if isinstance(m, torch.nn.Linear)]
    assert widths == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in head["layers"] if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


def test_score_is_the_head_on_the_normalised_clip_embedding(scorer, files, images):
    assert isinstance(scorer, AestheticScorer) and not scorer.head.training
    state = torch.load(files[1], weights_only=True)
    pixels = scorer.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = scorer.clip.visual_projection(scorer.clip.vision_model(pixel_values=pixels).pooler_output)
        x = embeds / embeds.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # dropout is off in evaluation
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    out = scorer.score(images, [""] * 3, [{}] * 3)
    np.testing.assert_allclose(out.scores, x.squeeze(1).numpy(), rtol=1e-5, atol=1e-6)
    assert len(set(out.scores.round(6))) == 3
    assert scorer.score(images[1:2], [""], [{}]).scores[0] == pytest.approx(out.scores[1], rel=1e-5)


def test_a_head_for_another_clip_width_is_refused(files, tmp_path):
    head = make_tiny_aesthetic_head(tmp_path / "wide.pth", 768)
    with pytest.raises(ValueError, match="takes 768-wide embeddings but reward.aesthetic.clip gives 16"):
        AestheticScorer(RewardConfig(aesthetic=AestheticConfig(clip=files[0], head=str(head), device="cpu")))


def test_a_missing_head_file_names_the_field(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.aesthetic.head: .*missing.pth is not a file"):
        AestheticScorer(RewardConfig(aesthetic=AestheticConfig(clip=files[0], head=str(tmp_path / "missing.pth"))))
