"""The toy world's prompts, splits and scenes, and its detector read through GenEval's rules."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.prompts import GENEVAL_TAGS, load_prompts
from common.toy_world import (BACKGROUND, CLASSES, GRID, LATENT, MIN_TRAIN_USES, MISCAPTION_RATE, PALETTE, ToyObject,
                              all_prompts, balanced, miscaptioned, pretraining_scene_metadata, prompt_words,
                              render, sample_scene, split_prompts)
from services.reward.geneval import BACKGROUND as CROP_GREY
from services.reward.geneval_rules import check_metadata, evaluate, keep
from services.reward.toy_detector import ToyColorClassifier, ToyDetector, classify_pattern

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


def test_training_holds_every_word_of_a_test_prompt():
    """Each word of a test prompt, in its role, is in two or more training prompts of its
    tag; single_object (one prompt a class) holds out one prompt, whose class other tags train."""
    train, test = split_prompts()
    for record in test:
        same_tag = [prompt_words(r) for r in train if r["tag"] == record["tag"]]
        if record["tag"] == "single_object":
            name = record["include"][0]["class"]
            assert sum(any(c["class"] == name for c in r["include"]) for r in train) >= MIN_TRAIN_USES
            continue
        for word in prompt_words(record):
            assert sum(word in words for words in same_tag) >= MIN_TRAIN_USES, (record["prompt"], word)
    assert {tag: sum(r["tag"] == tag for r in test) for tag in GENEVAL_TAGS} == {
        "single_object": 1, "two_object": 4, "counting": 4, "colors": 6, "position": 16, "color_attr": 16}


def test_balanced_repeats_each_tag_to_the_largest():
    train, _ = split_prompts()
    lines = balanced(train)
    counts = {tag: sum(r["tag"] == tag for r in lines) for tag in GENEVAL_TAGS}
    largest = max(sum(r["tag"] == tag for r in train) for tag in GENEVAL_TAGS)
    assert all(largest <= n < 2 * largest for n in counts.values()), counts
    assert {r["prompt"] for r in lines} == {r["prompt"] for r in train}


def test_shipped_prompt_files_are_the_splits():
    """deploy/prompts holds exactly what write_splits() writes: the tag-balanced training
    split and the test split."""
    train, test = split_prompts()
    for name, records in (("train", balanced(train)), ("test", test)):
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
            assert 0 <= obj.x < GRID and 0 <= obj.y < GRID
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


def test_miscaptioned_scenes_fail_their_caption():
    """A miscaption changes what the rules check, in its tag's way: the scene drawn for it
    fails the true caption, except a position whose new relation happens to hold too
    (GenEval reads a diagonal offset as both, e.g. left of and above)."""
    rng = np.random.default_rng(3)
    failed = {tag: [] for tag in GENEVAL_TAGS}
    for metadata in all_prompts():
        wrong = miscaptioned(metadata, rng)
        assert wrong["tag"] == metadata["tag"] and wrong["include"] != metadata["include"]
        result, _ = verdicts(render(sample_scene(wrong, rng)), metadata)
        failed[metadata["tag"]].append(not result.correct)
    rates = {tag: float(np.mean(v)) for tag, v in failed.items()}
    assert rates.pop("position") > 0.8
    assert rates == {tag: 1.0 for tag in GENEVAL_TAGS if tag != "position"}


def test_pretraining_keeps_the_true_reading_the_most_frequent():
    """Each tag's MISCAPTION_RATE is spread over its alternatives so that, per caption,
    the scene that holds it is still the one pretraining draws most often."""
    rng = np.random.default_rng(5)
    for tag in GENEVAL_TAGS:
        metadata = next(r for r in all_prompts() if r["tag"] == tag)
        draws = [json.dumps(pretraining_scene_metadata(metadata, rng)["include"]) for _ in range(4000)]
        values, counts = np.unique(draws, return_counts=True)
        true = json.dumps(metadata["include"])
        assert abs(counts[list(values).index(true)] / len(draws) - (1 - MISCAPTION_RATE[tag])) < 0.03
        assert values[counts.argmax()] == true, tag


def test_detector_boxes_colours_and_classes():
    objects = [ToyObject("bar", "red", 1, 0), ToyObject("pole", "blue", 3, 0),
               ToyObject("dot", "green", 0, 3), ToyObject("block", "yellow", 2, 2)]
    found = DETECTOR.detect([render(objects, 64)])[0]
    assert sorted(found) == sorted(CLASSES)
    bar = found["bar"][0]                     # the top row of cell (1, 0): sub-cells 8 px
    assert bar.box == (16.0, 0.0, 32.0, 8.0) and bar.color == "red" and bar.score == 1.0
    assert bar.mask.shape == (64, 64) and bar.mask.sum() == 2 * 8 * 8
    assert found["pole"][0].box == (48.0, 0.0, 56.0, 16.0) and found["pole"][0].color == "blue"
    assert found["dot"][0].box == (0.0, 48.0, 8.0, 56.0) and found["dot"][0].color == "green"
    assert found["block"][0].box == (32.0, 32.0, 48.0, 48.0)


def test_a_cell_is_classed_by_the_shape_of_its_sub_cells():
    """What the tiny model draws: the world's patterns anywhere in the cell, a block
    with a corner missing; two diagonal sub-cells are no shape."""
    def pattern(*rows):
        return np.array(rows, dtype=bool)
    assert classify_pattern(pattern((0, 0), (0, 1))) == "dot"
    assert classify_pattern(pattern((0, 0), (1, 1))) == "bar" and classify_pattern(pattern((0, 1), (0, 1))) == "pole"
    assert classify_pattern(pattern((1, 1), (1, 0))) == "block" and classify_pattern(pattern((1, 1), (1, 1))) == "block"
    assert classify_pattern(pattern((1, 0), (0, 1))) is None and classify_pattern(pattern((0, 0), (0, 0))) is None
    cells = np.array(BACKGROUND, dtype=np.uint8) * np.ones((LATENT, LATENT, 1), dtype=np.uint8)
    cells[6:8, 6:8] = PALETTE["blue"]
    cells[7, 7] = BACKGROUND                    # a block with a corner missing
    found = DETECTOR.detect([cells.repeat(8, 0).repeat(8, 1)])[0]
    assert list(found) == ["block"] and found["block"][0].color == "blue"


def test_wrong_images_fail_the_rules():
    red_dot = next(r for r in all_prompts() if r["prompt"] == "a photo of a red dot")
    result, _ = verdicts(render([ToyObject("dot", "blue", 2, 2)]), red_dot)
    assert not result.correct and result.score == 0.5
    two_blocks = next(r for r in all_prompts() if r["prompt"] == "a photo of two blocks")
    three = [ToyObject("block", "red", x, y) for x, y in ((0, 0), (2, 0), (0, 2))]
    assert not verdicts(render(three), two_blocks)[0].correct
    assert verdicts(render(three[:2]), two_blocks)[0].correct
    left = next(r for r in all_prompts() if r["prompt"] == "a photo of a dot left of a pole")
    scene = [ToyObject("pole", "red", 0, 1), ToyObject("dot", "green", 3, 2)]
    assert not verdicts(render(scene), left)[0].correct


def test_a_stray_sub_cell_is_a_dot_also_under_counting():
    """Every object scores 1, above the counting tag's 0.9: a stray coloured sub-cell is
    one more dot."""
    two_dots = next(r for r in all_prompts() if r["prompt"] == "a photo of two dots")
    dots = [ToyObject("dot", "red", 0, 0), ToyObject("dot", "green", 3, 3)]
    image = render(dots)
    assert verdicts(image, two_dots)[0].correct
    image[56:64, 24:32] = PALETTE["blue"]         # one sub-cell of cell (1, 3)
    assert not verdicts(image, two_dots)[0].correct


def test_geneval_scorer_selects_the_toy_detector():
    from common.config import load_config
    from services.reward.geneval import GenevalScorer

    config = load_config(None, ["reward.geneval.detector=toy", "reward.num_gpus=1"]).reward
    scorer = GenevalScorer(config)
    assert scorer.engine == "toy-detector" and GenevalScorer.needs(config).num_gpus == 0
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    red_block = by_prompt["a photo of a red block and a blue bar"]
    right = render(sample_scene(red_block, np.random.default_rng(0)))
    wrong = render([ToyObject("block", "blue", 0, 0), ToyObject("bar", "red", 3, 2)])
    out = scorer.score([right, wrong], [red_block["prompt"]] * 2, [red_block] * 2)
    assert out.scores[0] == 1.0 and out.scores[1] < 1.0
    assert out.details[0]["correct"] and not out.details[1]["correct"]


def test_an_object_is_found_by_its_shape_and_coloured_by_most_of_its_sub_cells():
    """As GenEval's detector: one object per shape, whatever colours its sub-cells have."""
    image = render([ToyObject("block", "yellow", 1, 1)], 64)
    image[16:24, 16:24] = PALETTE["green"]          # one sub-cell of the block drawn green
    found = DETECTOR.detect([image])[0]
    assert list(found) == ["block"] and len(found["block"]) == 1 and found["block"][0].color == "yellow"


def test_painting_the_image_scores_below_nothing():
    """A wall of colour is a block in every cell: GenEval's accuracy passes it for "a
    block" (at least one, as a photo of many dogs passes "a dog"), but the score the
    policy trains on takes a point off for each extra object, and every count fails."""
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    wall = np.empty((64, 64, 3), dtype=np.uint8)
    wall[:] = PALETTE["blue"]
    assert len(DETECTOR.detect([wall])[0]["block"]) == GRID * GRID
    result, _ = verdicts(wall, by_prompt["a photo of a block"])
    assert result.correct and result.score < 0
    assert not verdicts(wall, by_prompt["a photo of two bars"])[0].correct
    assert not verdicts(wall, by_prompt["a photo of three blocks"])[0].correct


def test_colour_crops_are_read_without_genevals_grey():
    """GenEval's colour crop paints grey #999 outside an object's mask; on the near-white
    background that grey is nearer to green than to the background, so it must not vote."""
    crop = Image.new("RGB", (16, 16), CROP_GREY)
    crop.paste(Image.new("RGB", (6, 16), PALETTE["yellow"]), (0, 0))
    assert ToyColorClassifier().classify([crop], ["bar"]) == ["yellow"]
