"""The toy knowledge bench (tests/bench/bench_toy_knowledge.py) reads rendered scenes as
their truth: a scene drawn for its caption is "asked" / "right", one drawn for the
reversed relation or the swapped colours is not."""
import numpy as np

from common.toy_world import all_prompts, miscaptioned, render, sample_scene
from services.reward.geneval_rules import keep
from services.reward.toy_detector import ToyDetector
from tests.bench.bench_toy_knowledge import caption_match, composition

DETECTOR = ToyDetector()


def outcomes(tag: str, misdescribed: bool) -> list[str]:
    rng = np.random.default_rng(0)
    records = [r for r in all_prompts() if r["tag"] == tag][:12]
    drawn = [miscaptioned(r, rng) if misdescribed else r for r in records]
    images = [render(sample_scene(m, rng)) for m in drawn]
    return [composition(r, keep(d, tag))[1] for r, d in zip(records, DETECTOR.detect(images))]


def test_position_reads_the_targets_relation_to_the_reference():
    assert outcomes("position", misdescribed=False) == ["asked"] * 12
    assert "asked" not in outcomes("position", misdescribed=True)


def test_colour_attribution_tells_right_from_swapped():
    assert outcomes("color_attr", misdescribed=False) == ["right"] * 12
    assert outcomes("color_attr", misdescribed=True) == ["swapped"] * 12


def test_caption_match_reads_the_models_marker(tmp_path):
    (tmp_path / "flowgrpo_toy.json").write_text('{"miscaption_rate": {"position": 0.25}}')
    assert caption_match(str(tmp_path)) == {"position": 0.75}
