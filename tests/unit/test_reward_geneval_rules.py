"""GenEval's rules on hand-built detections: every tag, exclude clauses, thresholds,
and the position margin's edges, for the benchmark verdict and the training score."""
import pytest

from services.reward.geneval_rules import (
    MAX_OBJECTS, Detection, evaluate, keep, objects_needing_color, relative_position)


def obj(x0=0, y0=0, x1=10, y1=10, score=0.95, color=None):
    return Detection(box=(x0, y0, x1, y1), score=score, color=color)


def many(n, score=0.95, color=None):
    return [obj(20 * i, 0, 20 * i + 10, 10, score=score, color=color) for i in range(n)]


SINGLE = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"}
TWO = {"tag": "two_object", "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}]}
COUNTING = {"tag": "counting", "include": [{"class": "stop sign", "count": 4}],
            "exclude": [{"class": "stop sign", "count": 5}]}
COLORS = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                                {"class": "scissors", "count": 1, "color": "black"}]}
POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                            {"class": "cow", "count": 1, "position": ["right of", 0]}]}


def verdict(metadata, detections, failed_relation="paper"):
    r = evaluate(metadata, detections, failed_relation)
    return r.correct, r.strict, pytest.approx(r.score)


# ---------------------------------------------------------------- single_object, two_object

def test_single_object():
    assert verdict(SINGLE, {"bowl": [obj(score=0.5)]}) == (True, True, 1.0)
    assert verdict(SINGLE, {}) == (False, False, 0.0)
    assert verdict(SINGLE, {"cat": [obj()]}) == (False, False, 0.0)


def test_threshold_is_strictly_above_0_3():
    assert evaluate(SINGLE, {"bowl": [obj(score=0.3)]}).correct is False
    assert evaluate(SINGLE, {"bowl": [obj(score=0.31)]}).correct is True


def test_extra_objects_pass_the_benchmark_but_cost_score_unclipped():
    # correct asks for at least `count`; the score's count part is 1 - |count - found| / count
    assert verdict(SINGLE, {"bowl": many(2)}) == (True, False, 0.0)
    assert verdict(SINGLE, {"bowl": many(3)}) == (True, False, -1.0)


def test_two_object():
    assert verdict(TWO, {"bowl": [obj()], "skis": [obj(50, 0, 60, 10)]}) == (True, True, 1.0)
    assert verdict(TWO, {"bowl": [obj()]}) == (False, False, 0.5)


# ---------------------------------------------------------------- counting and exclude

def test_counting_exact():
    assert verdict(COUNTING, {"stop sign": many(4)}) == (True, True, 1.0)


def test_counting_uses_the_0_9_threshold():
    assert verdict(COUNTING, {"stop sign": many(4) + many(1, score=0.85)}) == (True, True, 1.0)
    assert verdict(COUNTING, {"stop sign": many(4, score=0.85)}) == (False, False, 0.0)


def test_counting_too_many_hits_the_exclude_clause():
    assert verdict(COUNTING, {"stop sign": many(5)}) == (False, False, 0.75)


def test_counting_too_few():
    assert verdict(COUNTING, {"stop sign": many(3)}) == (False, False, 0.75)
    assert verdict(COUNTING, {"stop sign": many(2)}) == (False, False, 0.5)


def test_at_most_16_objects_per_class_are_kept():
    kept = keep({"stop sign": many(20)}, "counting")
    assert len(kept["stop sign"]) == MAX_OBJECTS
    assert verdict(COUNTING, {"stop sign": many(20)}) == (False, False, 1 - 12 / 4)


def test_keep_sorts_by_score():
    kept = keep({"cup": [obj(score=0.4), obj(score=0.9), obj(score=0.6)]}, "colors")
    assert [d.score for d in kept["cup"]] == [0.9, 0.6, 0.4]


def test_exclude_of_another_class_enters_correct_only():
    metadata = {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                "exclude": [{"class": "dog", "count": 1}]}
    assert verdict(metadata, {"cat": [obj()]}) == (True, True, 1.0)
    assert verdict(metadata, {"cat": [obj()], "dog": [obj()]}) == (False, True, 1.0)


# ---------------------------------------------------------------- colours

def test_colors():
    assert verdict(COLORS, {"cup": [obj(color="purple")]}) == (True, True, 1.0)
    assert verdict(COLORS, {"cup": [obj(color="blue")]}) == (False, False, 0.5)
    assert verdict(COLORS, {}) == (False, False, 0.0)  # count part 0 and one 0 for the colour part


def test_colour_is_read_on_the_most_confident_objects():
    detections = {"cup": [obj(score=0.5, color="blue"), obj(score=0.9, color="purple")]}
    r = evaluate(COLORS, detections)
    assert r.correct  # the top cup is purple; the second is not looked at
    assert (r.strict, r.score) == (False, pytest.approx(0.0 / 2))  # 2 cups: count part 0, colour part 0


def test_extra_objects_count_what_the_prompt_names_beyond_its_counts():
    """correct passes with more objects than asked; extra_objects shows them (per class,
    a missing object does not cancel another class's extra; unnamed classes do not count)."""
    r = evaluate(TWO, {"bowl": many(3), "skis": [obj()], "cat": many(2)})
    assert (r.correct, r.strict, r.extra_objects) == (True, False, 2)
    assert evaluate(TWO, {"bowl": many(2)}).extra_objects == 1
    assert evaluate(COUNTING, {"stop sign": many(4)}).extra_objects == 0
    assert evaluate(COUNTING, {"stop sign": many(6)}).extra_objects == 2


def test_color_attr():
    right = {"handbag": [obj(color="pink")], "scissors": [obj(30, 0, 40, 10, color="black")]}
    assert verdict(COLOR_ATTR, right) == (True, True, 1.0)
    wrong = {"handbag": [obj(color="pink")], "scissors": [obj(30, 0, 40, 10, color="white")]}
    assert verdict(COLOR_ATTR, wrong) == (False, False, 0.75)


def test_objects_needing_color_are_the_top_count_of_colour_clauses():
    kept = keep({"handbag": [obj(score=0.5), obj(score=0.8)], "scissors": [obj()], "cat": [obj()]}, "color_attr")
    wanted = objects_needing_color(COLOR_ATTR, kept)
    assert sorted(wanted) == ["handbag", "scissors"]
    assert [d.score for d in wanted["handbag"]] == [0.8]


def test_missing_colour_is_a_clear_error():
    with pytest.raises(ValueError, match="classify the colours"):
        evaluate(COLORS, {"cup": [obj()]})


# ---------------------------------------------------------------- position

LAPTOP = obj(0, 0, 10, 10)


def test_position_right():
    assert verdict(POSITION, {"laptop": [LAPTOP], "cow": [obj(30, 0, 40, 10)]}) == (True, True, 1.0)


WRONG_PLACE = {"laptop": [LAPTOP], "cow": [obj(-30, 0, -20, 10)]}  # the cow left of the laptop


def test_position_wrong_relation_scores_as_the_papers_server_by_default():
    # parts 1 (laptop), 1 (cow), 0 (relation) and the 1 the server appends after it
    assert verdict(POSITION, WRONG_PLACE) == (False, False, 0.75)


def test_position_wrong_relation_counted_once_on_request():
    assert verdict(POSITION, WRONG_PLACE, "once") == (False, False, 2 / 3)


def test_failed_relation_must_be_known():
    with pytest.raises(ValueError, match="paper, once"):
        evaluate(POSITION, WRONG_PLACE, "twice")


@pytest.mark.parametrize("failed_relation", ["paper", "once"])
def test_position_missing_objects(failed_relation):
    assert verdict(POSITION, {"laptop": [LAPTOP]}, failed_relation) == (False, False, 1 / 3)
    r = evaluate(POSITION, {"cow": [obj(30, 0, 40, 10)]}, failed_relation)  # the referenced clause did not match
    assert (r.correct, r.strict, r.score) == (False, False, pytest.approx(1 / 3))
    assert "no target" in r.reason


def test_position_against_every_target_object():
    metadata = {"tag": "position", "include": [{"class": "laptop", "count": 2},
                                                {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    between = {"laptop": [obj(0, 0, 10, 10), obj(60, 0, 70, 10)], "cow": [obj(30, 0, 40, 10)]}
    assert verdict(metadata, between)[0] is False
    right = {"laptop": [obj(0, 0, 10, 10), obj(0, 20, 10, 30)], "cow": [obj(30, 10, 40, 20)]}
    assert verdict(metadata, right) == (True, True, 1.0)


@pytest.mark.parametrize("b, expected", [
    ((20, 0, 30, 10), {"left of"}),             # offset -20, margin 2: dx = -0.9
    ((-20, 0, -10, 10), {"right of"}),
    ((0, 20, 10, 30), {"above"}),                # image y grows downwards
    ((0, -20, 10, -10), {"below"}),
    ((20, 20, 30, 30), {"left of", "above"}),    # dx = dy = -18 / 28.3 = -0.64
    ((2, 0, 12, 10), set()),                     # |offset| = margin: revised 0
    ((2.0005, 0, 12.0005, 10), set()),           # |revised| = 5e-4 < 1e-3
    ((4, 0, 14, 10), set()),                     # |offset| = 2 x margin: dx = -0.5, not < -0.5
    ((4.1, 0, 14.1, 10), {"left of"}),           # just past it: dx = -2.1 / 4.1
    ((20, 5, 30, 15), {"left of"}),              # dy = -3 / 20.6, too small for "above"
])
def test_relative_position_margin(b, expected):
    assert relative_position(obj(0, 0, 10, 10), obj(*b)) == expected


def test_margin_grows_with_box_sizes():
    # offset 20 would be "right of" between small boxes (margin 2: dx = 0.9); beside a
    # 100 px box the margin is 0.1 x (100 + 10) = 11, so dx = 9 / 20 = 0.45: no relation
    big = obj(0, 0, 100, 100)
    assert relative_position(obj(65, 45, 75, 55), obj(45, 45, 55, 55)) == {"right of"}
    assert relative_position(obj(65, 45, 75, 55), big) == set()
    assert relative_position(obj(95, 45, 105, 55), big) == {"right of"}


# ---------------------------------------------------------------- malformed metadata

@pytest.mark.parametrize("metadata, words", [
    ({"include": [{"class": "cat", "count": 1}]}, "'tag'"),
    ({"tag": "single_object", "include": []}, "non-empty 'include'"),
    ({"tag": "single_object", "include": [{"class": "cat"}]}, "'count'"),
    ({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, "teal"),
    ({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}, "earlier"),
    ({"tag": "position", "include": [{"class": "cat", "count": 1},
                                     {"class": "dog", "count": 1, "position": ["near", 0]}]}, "near"),
])
def test_malformed_metadata_names_the_field(metadata, words):
    with pytest.raises(ValueError, match="GenEval metadata") as err:
        evaluate(metadata, {})
    assert words in str(err.value)
