"""The learner group's checks that need no cluster: rank digests and metrics."""
import pytest

from services.controller.learner_group import LearnerDiverged, LearnerGroup, combine_rank_metrics


def test_ranks_holding_different_weights_stop_the_run():
    group = object.__new__(LearnerGroup)  # the check alone; no actors
    group.config = type("C", (), {"learner": type("L", (), {"num_workers": 2})})()
    group._check_identical(["abc", "abc"], "after the update")
    with pytest.raises(LearnerDiverged, match="2 learner ranks hold different LoRA weights after the update"):
        group._check_identical(["abc", "abd"], "after the update")


def test_rank_metrics_combine_as_one_learners():
    ranks = [{"samples_trained": 8.0, "loss": 1.0, "learn_seconds": 2.0, "ratio_dev_before_update": 0.0},
             {"samples_trained": 24.0, "loss": 3.0, "learn_seconds": 3.0, "ratio_dev_before_update": 1e-6}]
    out = combine_rank_metrics(ranks)
    assert out["samples_trained"] == 32.0 and out["learn_seconds"] == 3.0
    assert out["ratio_dev_before_update"] == 1e-6 and out["loss"] == pytest.approx(2.5)  # weighted by samples
    assert out["learner_ranks"] == 2.0
