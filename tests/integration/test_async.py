"""Async mode with bounded staleness and the hung-worker check, on the session's Ray
cluster with the tiny model and one rollout worker."""
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from services.controller.async_trainer import AsyncTrainer
from services.controller.job import train
from services.controller.trainer import SyncTrainer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def one_worker(run_config):
    def make(*overrides):
        return run_config("rollout.num_workers=1", "run.checkpoint_every=1", "run.sample_images_every=0", "train.ema_every=1", *overrides)
    return make


def versions_per_iteration(run_dir):
    log = pq.read_table(Path(run_dir) / "rollouts")
    out = {}
    for it, v in zip(log.column("iteration").to_pylist(), log.column("policy_version").to_pylist()):
        out.setdefault(it, set()).add(v)
    return out


def test_async_with_no_staleness_is_the_sync_run(one_worker, tmp_path):
    sync = train(one_worker("run.iterations=2"), tmp_path / "sync")
    async0 = train(one_worker("run.iterations=2", "run.mode=async", "run.max_staleness=0"), tmp_path / "async")
    for key in ["reward_mean", "loss", "grad_norm", "policy_version"]:
        assert [h[key] for h in async0] == [h[key] for h in sync], key
    a, s = pq.read_table(tmp_path / "async" / "rollouts"), pq.read_table(tmp_path / "sync" / "rollouts")
    assert a.column("reward").to_pylist() == s.column("reward").to_pylist()
    assert all(h["staleness"] == 0 and h["staleness/0"] == 8 for h in async0)


def test_staleness_is_bounded_and_a_resumed_run_gives_the_same_next_iteration(one_worker, tmp_path):
    config = one_worker("run.iterations=4", "run.mode=async", "run.max_staleness=2")
    history = train(config, tmp_path / "run")
    # iteration j is sampled with version max(0, j - 2) and trained at version j: admitted
    # before sampling, never more than 2 versions old, and nothing refused or discarded
    assert versions_per_iteration(tmp_path / "run") == {0: {0}, 1: {0}, 2: {0}, 3: {1}}
    assert [h["staleness"] for h in history] == [0, 1, 2, 2]
    assert [sorted(k for k in h if k.startswith("staleness/")) for h in history][2:] == [["staleness/2"]] * 2
    assert all(h["samples_refused_stale"] == 0 and h["chunks_resampled"] == 0 for h in history)
    for key in ["time/rollout", "time/rollout_compute", "time/learn"]:
        assert all(h[key] > 0 for h in history), key
    assert all(h["time/rollout"] < h["time/iteration"] for h in history)
    assert all("time/learner_idle" in h and "time/rollout_idle" in h for h in history[1:])
    # resume from the checkpoint after iteration 2, with iterations 2 and 3 in flight
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    shutil.copytree(tmp_path / "run" / "checkpoints" / "iter_000002", resumed / "checkpoints" / "iter_000002")
    again = train(config, resumed, resume=True)
    for key in ["reward_mean", "loss", "grad_norm", "staleness", "policy_version"]:
        assert [h[key] for h in again] == [h[key] for h in history[2:]], key
    assert versions_per_iteration(resumed) == {2: {0}, 3: {1}}


class SlowUpdate(AsyncTrainer):
    """The update takes longer than rollout.timeout_s, while the next iteration's rollout
    calls finish and wait to be collected."""

    def learn(self, scored):
        metrics = super().learn(scored)
        time.sleep(3 * self.config.rollout.timeout_s)
        return metrics


def test_an_update_slower_than_the_rollout_timeout_kills_no_worker(one_worker, tmp_path, capfd):
    trainer = SlowUpdate(one_worker("run.iterations=3", "run.mode=async", "run.checkpoint_every=0",
                                    "rollout.timeout_s=1"), tmp_path / "run")
    trainer.start()
    try:
        pid = ray.get(trainer.rollouts[0].actor.__ray_call__.remote(lambda worker: __import__("os").getpid()))
        history = trainer.train()
        pid_after = ray.get(trainer.rollouts[0].actor.__ray_call__.remote(lambda worker: __import__("os").getpid()))
    finally:
        trainer.stop()
    assert pid_after == pid
    assert [h["chunks_resampled"] for h in history] == [0, 0, 0]
    assert "made no progress" not in capfd.readouterr().err


def test_a_worker_that_stops_making_progress_is_restarted(one_worker, tmp_path):
    """SIGSTOP the rollout worker's process mid-iteration: its call makes no progress and
    it answers nothing, so after rollout.timeout_s it is killed and its chunks sampled again."""
    import os
    import signal

    trainer = SyncTrainer(one_worker("run.iterations=2", "run.checkpoint_every=0", "rollout.timeout_s=2"),
                          tmp_path / "run")
    trainer.start()
    try:
        first = trainer.iteration(0)
        pid = ray.get(trainer.rollouts[0].actor.__ray_call__.remote(lambda worker: os.getpid()))
        os.kill(pid, signal.SIGSTOP)
        second = trainer.iteration(1)
    finally:
        trainer.stop()
    assert second["chunks_resampled"] >= 1
    assert second["images"] == first["images"] == 8
