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
    objects = [ToyObject("bar", "red", 1, 0, 4, 1), ToyObject("pole", "blue", 6, 2, 1, 4),
               ToyObject("dot", "green", 0, 6, 1, 1), ToyObject("block", "yellow", 3, 4, 2, 2)]
    found = DETECTOR.detect([render(objects, 64)])[0]
    assert sorted(found) == sorted(CLASSES)
    bar = found["bar"][0]
    assert bar.box == (8.0, 0.0, 40.0, 8.0) and bar.color == "red" and bar.score == 1.0
    assert bar.mask.shape == (64, 64) and bar.mask.sum() == 4 * 1 * 64
    assert found["pole"][0].color == "blue" and found["dot"][0].color == "green"
    assert found["block"][0].box == (24.0, 32.0, 40.0, 48.0)


def test_blob_shapes_keep_their_class():
    """What the tiny model draws: whole objects, and some a cell short or long."""
    assert classify_shape(3, 1) == "bar" and classify_shape(1, 4) == "pole" and classify_shape(4, 2) == "bar"
    assert classify_shape(2, 2) == "block" and classify_shape(2, 1) == "block" and classify_shape(3, 2) == "block"
    assert classify_shape(1, 1) == "dot"
    cells = np.full((GRID, GRID, 3), 128, dtype=np.uint8)
    cells[3:5, 3:5] = PALETTE["blue"]
    cells[4, 4] = 128                     # a block with a corner missing
    found = DETECTOR.detect([cells.repeat(8, 0).repeat(8, 1)])[0]
    assert list(found) == ["block"] and found["block"][0].color == "blue"


def test_wrong_images_fail_the_rules():
    red_dot = next(r for r in all_prompts() if r["prompt"] == "a photo of a red dot")
    result, _ = verdicts(render([ToyObject("dot", "blue", 4, 4, 1, 1)]), red_dot)
    assert not result.correct and result.score == 0.5
    two_blocks = next(r for r in all_prompts() if r["prompt"] == "a photo of two blocks")
    three = [ToyObject("block", "red", x, 2, 2, 2) for x in (0, 3, 6)]
    assert not verdicts(render(three), two_blocks)[0].correct
    assert verdicts(render(three[:2]), two_blocks)[0].correct
    left = next(r for r in all_prompts() if r["prompt"] == "a photo of a dot left of a pole")
    scene = [ToyObject("pole", "red", 1, 2, 1, 4), ToyObject("dot", "green", 6, 3, 1, 1)]
    assert not verdicts(render(scene), left)[0].correct


def test_a_stray_cell_is_a_dot_also_under_counting():
    """Every component scores 1, above the counting tag's 0.9: a stray cell is one more dot."""
    two_dots = next(r for r in all_prompts() if r["prompt"] == "a photo of two dots")
    dots = [ToyObject("dot", "red", 1, 1, 1, 1), ToyObject("dot", "green", 5, 5, 1, 1)]
    assert verdicts(render(dots), two_dots)[0].correct
    assert not verdicts(render(dots + [ToyObject("dot", "blue", 1, 6, 1, 1)]), two_dots)[0].correct


def test_geneval_scorer_selects_the_toy_detector():
    from common.config import load_config
    from services.reward.geneval import GenevalScorer

    config = load_config(None, ["reward.geneval.detector=toy", "reward.num_gpus=1"]).reward
    scorer = GenevalScorer(config)
    assert scorer.engine == "toy-detector" and GenevalScorer.needs(config).num_gpus == 0
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    red_block = by_prompt["a photo of a red block and a blue bar"]
    right = render(sample_scene(red_block, np.random.default_rng(0)))
    wrong = render([ToyObject("block", "blue", 0, 0, 2, 2), ToyObject("bar", "red", 3, 5, 4, 1)])
    out = scorer.score([right, wrong], [red_block["prompt"]] * 2, [red_block] * 2)
    assert out.scores[0] == 1.0 and out.scores[1] < 1.0
    assert out.details[0]["correct"] and not out.details[1]["correct"]


def test_an_object_is_found_by_its_shape_and_coloured_by_most_of_its_cells():
    """As GenEval's detector: one object per blob, whatever colours its cells have."""
    image = render([ToyObject("bar", "yellow", 1, 1, 4, 1)])
    image[8:16, 16:24] = PALETTE["green"]          # one cell of the bar drawn green
    found = DETECTOR.detect([image])[0]
    assert list(found) == ["bar"] and len(found["bar"]) == 1 and found["bar"][0].color == "yellow"


def test_a_blob_larger_than_any_object_is_none():
    """A wall of colour is no block: painting the image blue does not pass as one."""
    one_block = next(r for r in all_prompts() if r["prompt"] == "a photo of a block")
    wall = np.empty((64, 64, 3), dtype=np.uint8)
    wall[:] = PALETTE["blue"]
    assert DETECTOR.detect([wall])[0] == {}
    assert verdicts(wall, one_block)[0].score == 0.0
    assert DETECTOR.detect([render([ToyObject("block", "red", 2, 2, 3, 2)])])[0]["block"]   # 6 cells: still a block
