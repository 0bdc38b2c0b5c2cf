"""The scorer throughput tool (tests/bench/bench_reward.py): each scorer measured in
process and through a local gRPC service, one it cannot load reported and skipped."""
import re

import pytest

from tests.bench.bench_reward import main, sample_batch, timed


def test_timed_warms_up_once_then_averages_the_repeats():
    class Worker:
        calls = 0

        def score(self, batch):
            self.calls += 1
            return batch, []

    worker = Worker()
    assert timed(worker, sample_batch(2, 32), repeats=3) >= 0 and worker.calls == 1 + 3


def test_a_failing_scorer_stops_the_measurement():
    class Worker:
        def score(self, batch):
            return batch, [type("Failure", (), {"scorer": "ocr", "reason": "engine crashed"})()]

    with pytest.raises(RuntimeError, match="ocr failed: engine crashed"):
        timed(Worker(), sample_batch(2, 32), repeats=1)


def test_each_scorer_is_measured_or_reported_as_not_measured(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["--scorers", "aesthetic", "brightness", "--batch", "2", "--size", "64", "--repeats", "1", "--grpc"])
    aesthetic, brightness = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"aesthetic +not measured: FileNotFoundError: reward.aesthetic.head", aesthetic)
    found = re.match(r"brightness +([\d.]+) images/s +([\d.]+) ms/batch +\[numpy-mean\] +gRPC +([\d.]+) ms/batch", brightness)
    assert found, brightness
    per_s, ms, grpc_ms = map(float, found.groups())
    # the two figures agree to the printed precision (ms/batch has one decimal)
    assert abs(2 / per_s * 1000 - ms) <= 0.05 + 1e-9 and grpc_ms > 0
