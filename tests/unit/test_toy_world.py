"""The toy world's prompts, splits and scenes, and its detector read through GenEval's rules."""
from pathlib import Path

import numpy as np
import pytest

from common.prompts import GENEVAL_TAGS, load_prompts
from common.toy_world import (CLASSES, GRID, PALETTE, ToyObject, all_prompts, render, sample_scene,
                              split_prompts)
from services.reward.geneval_rules import check_metadata, evaluate, keep, objects_needing_color
from services.reward.toy_detector import ToyDetector, classify_shape

REPO = Path(__file__).resolve().parents[2]
DETECTOR = ToyDetector()


def verdicts(image, metadata):
    detections = DETECTOR.detect([image])[0]
    return evaluate(metadata, detections), keep(detections, metadata["tag"])


def test_splits_share_no_prompt_and_cover_every_tag():
    train, test = split_prompts()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len(train) + len(test) == len(all_prompts()) == len({r["prompt"] for r in all_prompts()})
    for split in (train, test):
        assert {r["tag"] for r in split} == set(GENEVAL_TAGS)
        for record in split:
            check_metadata(record)


def test_shipped_prompt_files_are_the_splits():
    """deploy/prompts holds exactly what split_prompts() gives (regenerate with write_splits)."""
    for name, records in zip(("train", "test"), split_prompts()):
        loaded = load_prompts(REPO / "deploy" / "prompts" / f"toy_geneval_{name}.jsonl", "geneval")
        assert [r.metadata for r in loaded] == records


def test_prompts_read_as_geneval_writes_them():
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    assert by_prompt["a photo of three bars"]["exclude"] == [{"class": "bar", "count": 4}]
    position = by_prompt["a photo of a dot left of a pole"]["include"]
    assert position == [{"class": "pole", "count": 1}, {"class": "dot", "count": 1, "position": ["left of", 0]}]
    assert by_prompt["a photo of a red block and a blue bar"]["tag"] == "color_attr"


@pytest.mark.parametrize("seed", [0, 1])
def test_scenes_hold_their_prompt(seed):
    rng = np.random.default_rng(seed)
    for metadata in all_prompts():
        objects = sample_scene(metadata, rng)
        assert len(objects) == sum(c["count"] for c in metadata["include"])
        for obj in objects:
            assert 0 <= obj.x and obj.x + obj.w <= GRID and 0 <= obj.y and obj.y + obj.h <= GRID
        for clause in metadata["include"]:
            mine = [o for o in objects if o.name == clause["class"]]
            assert len(mine) == clause["count"]
            assert "color" not in clause or {o.color for o in mine} == {clause["color"]}


def test_detector_reads_held_out_rendered_scenes_exactly():
    """Per tag, the rules' accuracy on rendered test-split scenes (truth known) is 1."""
    _, test = split_prompts()
    rng = np.random.default_rng(7)
    accuracy = {tag: [] for tag in GENEVAL_TAGS}
    for _ in range(5):
        for metadata in test:
            result, _ = verdicts(render(sample_scene(metadata, rng)), metadata)
            accuracy[metadata["tag"]].append(result.correct and result.strict and result.score == 1.0)
    assert {tag: float(np.mean(v)) for tag, v in accuracy.items()} == {tag: 1.0 for tag in GENEVAL_TAGS}


def test_detector_boxes_colours_and_classes():
    objects = [ToyObject("bar", "red", 1, 1, 7, 2), ToyObject("pole", "blue", 12, 4, 3, 8),
               ToyObject("dot", "green", 2, 12, 2, 2), ToyObject("block", "yellow", 5, 8, 4, 4)]
    found = DETECTOR.detect([render(objects, 64)])[0]
    assert sorted(found) == sorted(CLASSES)
    bar = found["bar"][0]
    assert bar.box == (4.0, 4.0, 32.0, 12.0) and bar.color == "red" and bar.score == 1.0
    assert bar.mask.shape == (64, 64) and bar.mask.sum() == 7 * 2 * 16
    assert found["pole"][0].color == "blue" and found["dot"][0].color == "green"


def test_blob_shapes_keep_their_class():
    """What the tiny model draws: rectangles with rounded (missing) corners."""
    assert classify_shape(7, 3) == "bar" and classify_shape(3, 7) == "pole"
    assert classify_shape(4, 4) == "block" and classify_shape(5, 4) == "block"
    assert classify_shape(2, 2) == "dot" and classify_shape(3, 3) == "dot"
    cells = np.full((GRID, GRID, 3), 128, dtype=np.uint8)
    cells[3:8, 3:8] = PALETTE["blue"]
    for y, x in ((3, 3), (3, 7), (7, 3), (7, 7)):
        cells[y, x] = 128
    found = DETECTOR.detect([cells.repeat(4, 0).repeat(4, 1)])[0]
    assert list(found) == ["block"] and found["block"][0].color == "blue"


def test_wrong_images_fail_the_rules():
    red_dot = next(r for r in all_prompts() if r["prompt"] == "a photo of a red dot")
    result, _ = verdicts(render([ToyObject("dot", "blue", 4, 4, 2, 2)]), red_dot)
    assert not result.correct and result.score == 0.5
    two_blocks = next(r for r in all_prompts() if r["prompt"] == "a photo of two blocks")
    three = [ToyObject("block", "red", x, 2, 4, 4) for x in (0, 6, 11)]
    assert not verdicts(render(three), two_blocks)[0].correct
    left = next(r for r in all_prompts() if r["prompt"] == "a photo of a dot left of a pole")
    scene = [ToyObject("pole", "red", 2, 4, 2, 7), ToyObject("dot", "green", 10, 6, 2, 2)]
    assert not verdicts(render(scene), left)[0].correct


def test_scraps_count_except_under_counting():
    """A 3-cell scrap scores 0.75: above GenEval's 0.3, below the counting tag's 0.9."""
    image = render([ToyObject("dot", "red", 1, 1, 2, 2), ToyObject("dot", "red", 8, 8, 2, 2)])
    image[8 * 4:9 * 4, 8 * 4:9 * 4] = 128   # one cell of the second dot gone
    found = DETECTOR.detect([image])[0]
    assert sorted(d.score for d in found["dot"]) == [0.75, 1.0]
    assert len(keep(found, "counting")["dot"]) == 1 and len(keep(found, "colors")["dot"]) == 2
    assert objects_needing_color({"tag": "colors", "include": [{"class": "dot", "count": 1, "color": "red"}]},
                                 keep(found, "colors"))["dot"][0].score == 1.0


def test_geneval_scorer_selects_the_toy_detector():
    from common.config import load_config
    from services.reward.geneval import GenevalScorer

    config = load_config(None, ["reward.geneval.detector=toy", "reward.num_gpus=1"]).reward
    scorer = GenevalScorer(config)
    assert scorer.engine == "toy-detector" and GenevalScorer.needs(config).num_gpus == 0
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    red_block = by_prompt["a photo of a red block and a blue bar"]
    right = render(sample_scene(red_block, np.random.default_rng(0)))
    wrong = render([ToyObject("block", "blue", 1, 1, 4, 4), ToyObject("bar", "red", 8, 10, 7, 2)])
    out = scorer.score([right, wrong], [red_block["prompt"]] * 2, [red_block] * 2)
    assert out.scores[0] == 1.0 and out.scores[1] < 1.0
    assert out.details[0]["correct"] and not out.details[1]["correct"]
