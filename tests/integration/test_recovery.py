"""Workers that die while a run goes: the run recovers and its records hold every
(iteration, group) exactly once. The session's Ray cluster, the tiny model."""
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.util.placement_group import placement_group_table

from services.controller import elastic
from services.controller.async_trainer import AsyncTrainer
from services.controller.trainer import SyncTrainer
from tests.helpers.run_records import logged_once

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def config(run_config):
    def make(*overrides):
        return run_config("rollout.num_workers=1", "run.sample_images_every=0", *overrides)
    return make


class KillsTheLearner(AsyncTrainer):
    """SIGKILLs the learner's process as its `nth` update starts."""
    nth = 4

    def learn(self, scored):
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == self.nth:
            self.killed_pid = self.learner.pids()[0]
            os.kill(self.killed_pid, signal.SIGKILL)
        return super().learn(scored)


def test_a_killed_learner_is_restarted_from_its_checkpoint(config, tmp_path, capfd):
    trainer = KillsTheLearner(config("run.mode=async", "run.iterations=5", "run.checkpoint_every=2"), tmp_path / "run")
    trainer.start()
    try:
        history = trainer.train()
        pid_after = trainer.learner.pids()[0]
    finally:
        trainer.stop()
    # killed in iteration 3's update: back to the checkpoint after iteration 2, 3 and 4 redone
    assert pid_after != trainer.killed_pid
    assert [h["policy_version"] for h in history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert logged_once(tmp_path / "run", 5)
    err = capfd.readouterr().err
    assert err.count("the learner died at iteration 3") == 1 and "from iter_000002" in err


class Scales(AsyncTrainer):
    """Asks for a second rollout worker as iteration 1 starts, the way `flowgrpo scale`
    does, and for one again two iterations after the second joined."""

    def iteration(self, it):
        if it == 1:
            elastic.request(self.run_dir, 2)
        self.events_while_waiting = getattr(self, "events_while_waiting", 0.0)
        if it == 2:  # the run waits for the new worker here: it starts slower than tiny iterations go
            while any(placement_group_table(p.group)["state"] != "CREATED" for p in self.elastic.placing):
                time.sleep(0.2)
            self.events_while_waiting += self.elastic.step()["scale_events"]
            self.placed_seen_by_next_step = not self.elastic.placing  # not only when a GCS reply lands in time
            while self.elastic.starting:
                time.sleep(0.5)
                self.events_while_waiting += self.elastic.step()["scale_events"]
        metrics = super().iteration(it)
        self.with_two = getattr(self, "with_two", 0) + (metrics["rollout_workers"] == 2)
        if self.with_two == 2:
            elastic.request(self.run_dir, 1)
        return metrics


def test_rollout_workers_scale_up_and_down_while_the_run_goes(config, tmp_path):
    trainer = Scales(config("run.mode=async", "run.iterations=7", "run.checkpoint_every=0"), tmp_path / "run")
    trainer.start()
    try:
        history = trainer.train()
        left = [h.name for h in trainer.rollouts]
    finally:
        trainer.stop()
    workers = [h["rollout_workers"] for h in history]
    assert trainer.placed_seen_by_next_step  # a placed group is started by the next step
    assert workers == [1, 1, 2, 2, 1, 1, 1] and left == ["rollout-0"]
    assert sum(h["scale_events"] for h in history) + trainer.events_while_waiting == 3  # requested, joined, removed
    log = pq.read_table(tmp_path / "run" / "rollouts")
    assert set(log.column("rollout_worker").to_pylist()) == {"rollout-0", "rollout-1"}
    assert logged_once(tmp_path / "run", 7)


def test_scale_names_a_run_folder_with_no_job(ray_cluster, tmp_path):
    with pytest.raises(elastic.ScaleError, match="RUN_DIR"):
        elastic.request(tmp_path, 2)


class KillsARolloutWorker(SyncTrainer):
    """SIGKILLs rollout worker 0's process with iteration 2's call in it."""

    def launch(self, it, min_version=None):
        if it != 2:
            return super().launch(it, min_version)
        self.killed_pid = ray.get(self.rollouts[0].actor.__ray_call__.remote(lambda worker: os.getpid()))
        os.kill(self.killed_pid, signal.SIGSTOP)  # so that the call cannot finish before the kill
        flight = super().launch(it, min_version)
        time.sleep(0.5)  # the call reaches the stopped process
        os.kill(self.killed_pid, signal.SIGKILL)
        return flight


def test_a_killed_rollout_worker_is_replaced_and_the_run_finishes(config, tmp_path):
    trainer = KillsARolloutWorker(config("rollout.num_workers=2", "run.iterations=4", "run.checkpoint_every=0"),
                                  tmp_path / "run")
    trainer.start()
    try:
        history = trainer.train()
        versions = ray.get([h.actor.policy_version.remote() for h in trainer.rollouts])
        pid = ray.get(trainer.rollouts[0].actor.__ray_call__.remote(lambda worker: os.getpid()))
    finally:
        trainer.stop()
    assert pid != trainer.killed_pid
    assert versions == [4, 4]  # the replacement holds the current version
    assert history[2]["chunks_resampled"] + history[2]["samples_refused_stale"] >= 1
    assert logged_once(tmp_path / "run", 4)


def test_flowgrpo_scale_reaches_the_run_from_another_process(ray_cluster, tmp_path):
    """`flowgrpo scale` in its own process joins this cluster and sets the run's wanted count."""
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address  # not "auto": other tests' clusters may be newer
    control = ray.remote(num_cpus=0)(elastic.ScaleControl).options(
        name=elastic.control_name(tmp_path), namespace=elastic.NAMESPACE).remote(1)
    def scale(run_dir, workers):
        return subprocess.run([sys.executable, "-m", "services.controller.cli", "scale", str(run_dir),
                               "--rollout-workers", str(workers), "--cluster", address],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])

    try:
        done = scale(tmp_path / ".", 3)
        assert done.returncode == 0, done.stderr
        assert ray.get(control.get.remote()) == 3
        other = scale(tmp_path / "other", 2)
        assert other.returncode == 2 and "no job is training in this run folder" in other.stderr
    finally:
        ray.kill(control)
