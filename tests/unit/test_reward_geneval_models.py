"""GenEval with a transformers detector, end to end on tiny random models of the
production classes (Mask2Former, CLIPModel) saved offline and loaded by the real loader."""
import numpy as np
import pytest
import torch
from transformers import Mask2FormerForUniversalSegmentation

from common.config import GenevalConfig, RewardConfig
from services.reward.geneval import (
    COLOR_TEMPLATES, GenevalScorer, crop_for_color, geneval_label_names, mask_box)
from services.reward.geneval_rules import COLORS, OBJECT_NAMES, Detection, evaluate
from services.reward.scorers import build_scorer
from tests.helpers.tiny_rewards import COCO_NAMES, make_tiny_clip, make_tiny_mask2former

BOWL = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"}
CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
RED_BOWL = {"tag": "colors", "include": [{"class": "bowl", "count": 1, "color": "red"}], "prompt": "a photo of a red bowl"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    clip = make_tiny_clip(root / "clip")
    detector = make_tiny_mask2former(root / "detector")
    # Make the random detector see bowls: every query's class logits are 10 for "bowl"
    # and -10 elsewhere, so each query with a non-empty mask is a confident bowl.
    model = Mask2FormerForUniversalSegmentation.from_pretrained(detector)
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-10.0)
        model.class_predictor.bias[COCO_NAMES.index("bowl")] = 10.0
    model.save_pretrained(detector)
    return detector, clip


def config(model_dirs, **kwargs):
    detector, clip = model_dirs
    return RewardConfig(weights={"geneval": 1.0},
                        geneval=GenevalConfig(detector=str(detector), clip=str(clip), device="cpu", **kwargs))


@pytest.fixture(scope="module")
def scorer(model_dirs):
    return build_scorer("geneval", config(model_dirs))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)


def test_loads_through_the_production_loader(scorer):
    assert isinstance(scorer, GenevalScorer)
    assert isinstance(scorer.detector.model, Mask2FormerForUniversalSegmentation)
    assert set(scorer.detector.names.values()) == set(OBJECT_NAMES)  # COCO's "mouse" is GenEval's "computer mouse"
    assert scorer.engine.startswith("transformers-mask2former:") and scorer.engine.endswith(":cpu")


def test_detections_are_boxes_scores_and_masks(scorer, images):
    detections = scorer.detector.detect(list(images))
    bowls = detections[0]["bowl"]
    assert bowls and set(detections[0]) == {"bowl"}
    for d in bowls:
        assert d.mask.shape == (96, 96) and d.mask.dtype == bool and d.mask.any()
        assert d.box == mask_box(d.mask) and d.score > 0.3


def test_end_to_end_verdicts(scorer, images):
    metadata = [BOWL, CAT, RED_BOWL]
    out = scorer.score(images, [m["prompt"] for m in metadata], metadata)
    bowl, cat, red = out.details
    assert bowl["correct"] is True
    assert cat["correct"] is False and "expected cat>=1" in cat["reason"]
    assert red["tag"] == "colors" and red["correct"] == (red["reason"] == "")  # a failed verdict says why
    # the scorer hands the detector's output to the rules unchanged
    detections = scorer.detector.detect(list(images[:1]))[0]
    assert out.scores[0] == evaluate(BOWL, detections).score


def test_reward_can_be_the_benchmark_verdict(model_dirs, images):
    scorer = GenevalScorer(config(model_dirs, reward="correct"))
    out = scorer.score(images[:2], ["a photo of a bowl", "a photo of a cat"], [BOWL, CAT])
    assert out.scores.tolist() == [1.0, 0.0]


POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                            {"class": "cow", "count": 1, "position": ["right of", 0]}]}


@pytest.mark.parametrize("failed_relation, score", [("paper", 0.75), ("once", 2 / 3)])
def test_a_wrong_relation_scores_as_configured(model_dirs, images, monkeypatch, failed_relation, score):
    scorer = GenevalScorer(config(model_dirs, failed_relation=failed_relation))
    cow_left_of_laptop = {"laptop": [Detection(box=(40, 0, 50, 10), score=0.9)],
                          "cow": [Detection(box=(0, 0, 10, 10), score=0.9)]}
    monkeypatch.setattr(scorer.detector, "detect", lambda batch: [cow_left_of_laptop for _ in batch])
    out = scorer.score(images[:1], ["a photo of a cow right of a laptop"], [POSITION])
    assert out.scores[0] == pytest.approx(score)
    assert {k: out.details[0][k] for k in ("tag", "correct", "strict")} == {
        "tag": "position", "correct": False, "strict": False}


def test_bad_metadata_gives_nan_for_that_image_only(scorer, images):
    out = scorer.score(images[:2], ["x", "a photo of a bowl"], [{"tag": "single_object"}, BOWL])
    assert np.isnan(out.scores[0]) and "include" in out.details[0]["error"]
    assert out.details[1]["correct"] is True


def test_colour_classifier_is_genevals_template_ensemble(scorer):
    colors = scorer.colors
    weights = colors._classifier("bowl")
    texts = [t.format(c=c, cls="bowl") for c in COLORS for t in COLOR_TEMPLATES]
    tokens = colors.processor(text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model = colors.model
        emb = model.text_projection(model.text_model(**tokens).pooler_output)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    expected = emb.reshape(10, 3, -1).mean(dim=1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, expected)
    crops = [crop_for_color(np.zeros((32, 32, 3), np.uint8), Detection((0, 0, 16, 16), 0.9))]
    assert colors.classify(crops, ["bowl"])[0] in COLORS


def test_colour_crop_paints_outside_the_mask_grey():
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = 255
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True
    mask[5, 10] = False
    crop = np.asarray(crop_for_color(image, Detection(box=mask_box(mask), score=0.9, mask=mask)))
    assert crop.shape == (5, 10, 3)
    assert crop[0, 0].tolist() == [0x99, 0x99, 0x99]
    assert crop[1, 1].tolist() == [255, 0, 0]


def test_mask_box_is_exclusive_at_the_far_edges():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:8] = True
    assert mask_box(mask) == (3.0, 2.0, 8.0, 5.0)


def test_detector_without_all_geneval_classes_is_refused():
    labels = dict(enumerate(COCO_NAMES[:-2]))
    with pytest.raises(ValueError, match="hair drier, toothbrush"):
        geneval_label_names(labels)
