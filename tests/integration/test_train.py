"""The actor-learner system on the session's local Ray cluster, with the tiny model."""
import json
import os
import signal
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.exceptions import RayActorError

from common.config import ConfigError, load_config
from services.controller.preflight import prepare
from services.controller.job import train
from services.controller.trainer import SyncTrainer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_config(run_config):
    def make(*overrides):
        return run_config("rollout.num_workers=2", "run.iterations=2", "run.checkpoint_every=1",
                          "run.sample_images_every=1", "train.ema_every=1", *overrides)
    return make


@pytest.fixture(scope="module")
def two_iterations(ray_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    trainer = SyncTrainer(ray_config(), run_dir)
    trainer.start()
    try:
        history = trainer.train()
        versions = ray.get([h.actor.policy_version.remote() for h in trainer.rollouts])
        learner_version = trainer.learner.ready()
    finally:
        trainer.stop()
    return run_dir, history, versions, learner_version


def test_every_worker_ends_on_the_learners_version(two_iterations):
    _, history, versions, learner_version = two_iterations
    assert learner_version == 2
    assert versions == [2, 2]
    assert [h["policy_version"] for h in history] == [1.0, 2.0]


def test_first_learner_step_is_on_policy(two_iterations):
    _, history, _, _ = two_iterations
    assert history[0]["ratio_dev_before_update"] < 1e-5
    assert all(np.isfinite(h["loss"]) for h in history)


def test_run_folder_has_everything(two_iterations):
    run_dir, history, _, _ = two_iterations
    for name in ["config.yaml", "metrics.jsonl", "reward_curve.png", "samples/iter_000000.png",
                 "samples/iter_000001.png", "checkpoints/iter_000001/learner.safetensors", "checkpoints/iter_000001/learner.json",
                 "checkpoints/iter_000001/COMPLETE", "checkpoints/iter_000002/controller.json",
                 "lora/pytorch_lora_weights.safetensors"]:
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ["reward/brightness/mean", "reward/brightness/std", "advantage_mean", "zero_std_group_fraction",
                "clip_fraction", "approx_kl", "kl", "loss", "grad_norm", "time/rollout", "time/reward_tail",
                "time/learn", "time/weight_sync", "images_per_second", "overhead_fraction",
                "scorer/brightness/images_per_s", "scorer/brightness/failed_calls", "scorer/brightness/engine/numpy-mean"]:
        assert key in rows[-1], key
    assert rows[-1]["scorer/brightness/images"] == 2 * 2 * 4  # cumulative over both iterations
    log = pq.read_table(run_dir / "rollouts")
    assert log.num_rows == 2 * 2 * 4
    assert "latents" not in log.column_names and "advantage" in log.column_names
    assert sorted(set(log.column("policy_version").to_pylist())) == [0, 1]
    import pandas  # a dependency: the README reads the log with it

    frame = pandas.read_parquet(run_dir / "rollouts")
    assert len(frame) == 2 * 2 * 4 and frame["reward"].between(0, 1).all()
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == ["iter_000000.parquet", "iter_000001.parquet"]
    assert groups_logged(log) == {(it, group): 4 for it in range(2) for group in (2 * it, 2 * it + 1)}


def groups_logged(log):
    """{(iteration, group): rows} of a rollout log."""
    keys = zip(log.column("iteration").to_pylist(), log.column("group").to_pylist())
    return dict(Counter(keys))


def test_final_lora_loads_into_the_stock_pipeline(two_iterations, tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    run_dir, _, _, _ = two_iterations
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    base = pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.load_lora_weights(str(run_dir / "lora"))
    tuned = pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert not np.array_equal(base, tuned)


def test_resume_gives_the_same_next_iteration(ray_config, two_iterations, tmp_path):
    run_dir, history, _, _ = two_iterations
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    # a copy of the run as it stood after iteration 1: config, metrics of iteration 0, checkpoint 1
    (resumed_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (resumed_dir / "checkpoints").mkdir()
    import shutil
    shutil.copytree(run_dir / "checkpoints" / "iter_000001", resumed_dir / "checkpoints" / "iter_000001")
    again = train(ray_config("run.iterations=3"), resumed_dir, resume=True)
    assert len(again) == 2
    for key in ["reward_mean", "loss", "grad_norm", "policy_version"]:
        assert again[0][key] == history[1][key], key
    # the resume is on record: from where, what changed, and the config it ran with
    lines = [json.loads(line) for line in (resumed_dir / "resumes.jsonl").read_text().splitlines()]
    assert [(line["iteration"], line["changed"]) for line in lines] == [(1, {"run.iterations": [2, 3]})]
    assert load_config(resumed_dir / "config.yaml") == ray_config("run.iterations=3")


def test_too_many_rollout_workers_fail_before_training(ray_config, tmp_path):
    with pytest.raises(ConfigError, match="rollout.num_workers"):
        train(ray_config("rollout.num_workers=8"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_model_path_names_the_field(tiny_config, tmp_path):
    with pytest.raises((ConfigError, FileNotFoundError), match="model.path"):
        prepare(tiny_config(f"model.path={tmp_path / 'missing'}"))


def test_dead_rollout_worker_is_replaced_and_its_chunks_resampled(ray_config, tmp_path):
    trainer = SyncTrainer(ray_config("run.iterations=3", "run.checkpoint_every=0"), tmp_path / "run")
    trainer.start()
    try:
        first = trainer.iteration(0)
        ray.kill(trainer.rollouts[0].actor, no_restart=False)  # Ray restarts it with version 0 weights
        second = trainer.iteration(1)
        versions = ray.get([h.actor.policy_version.remote() for h in trainer.rollouts])
    finally:
        trainer.stop()
    # its chunk is lost with the process, or refused by it, restarted on version 0, before sampling
    assert second["chunks_resampled"] + second["samples_refused_stale"] >= 1
    assert second["images"] == first["images"] == 2 * 4  # no group lost, none zero-filled
    assert versions == [2, 2]


class KillsOneScoringCall:
    """Stands in for a reward worker's handle. Its `nth` score call is in flight in the
    worker's process when that process is SIGKILLed: the process is stopped (SIGSTOP)
    before the call is sent, so the call cannot finish first."""

    def __init__(self, handle, nth):
        self.handle, self.nth, self.calls, self.killed_pid = handle, nth, 0, None
        self.score = SimpleNamespace(remote=self._score)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def pid(self):
        return ray.get(self.handle.__ray_call__.remote(lambda worker: os.getpid()))

    def _score(self, *args):
        self.calls += 1
        if self.calls != self.nth:
            return self.handle.score.remote(*args)
        self.killed_pid = self.pid()
        os.kill(self.killed_pid, signal.SIGSTOP)
        ref = self.handle.score.remote(*args)
        time.sleep(0.5)  # the call reaches the stopped process
        os.kill(self.killed_pid, signal.SIGKILL)
        return ref


def test_dead_reward_worker_scores_the_intact_batch_again(ray_config, tmp_path):
    trainer = SyncTrainer(ray_config("run.iterations=3", "run.checkpoint_every=0"), tmp_path / "run")
    trainer.start()
    killer = KillsOneScoringCall(trainer.rewards[0], nth=3)  # iteration 1's first chunk (2 chunks an iteration)
    trainer.rewards = [killer]
    try:
        history = trainer.train()
        restarted_pid = killer.pid()
    finally:
        trainer.rewards = [killer.handle]
        trainer.stop()
    assert killer.killed_pid is not None and restarted_pid != killer.killed_pid
    # the chunks sent to the dead worker (the one it was scoring, and one queued there) are scored again
    assert [h["chunks_rescored"] > 0 for h in history] == [False, True, False]
    assert [h["chunks_resampled"] for h in history] == [0.0, 0.0, 0.0]  # nothing sampled twice
    log = pq.read_table(tmp_path / "run" / "rollouts")
    assert groups_logged(log) == {(it, group): 4 for it in range(3) for group in (2 * it, 2 * it + 1)}


def test_async_mode_samples_while_the_learner_updates(ray_config, tmp_path):
    history = train(ray_config("run.mode=async", "run.iterations=3", "run.checkpoint_every=0"), tmp_path / "run")
    # the versions the rollout workers sampled with, from the rollout log (8 images an iteration):
    # iteration 1 was sampled during the update on iteration 0, still with version 0
    versions = pq.read_table(tmp_path / "run" / "rollouts").column("policy_version").to_pylist()
    assert [sorted(set(versions[8 * i:8 * (i + 1)])) for i in range(3)] == [[0], [0], [1]]
    # the learner trains on stale samples with the decoupled objective: the ratio is taken
    # against the weights at the start of the update (1 before its first step), and the
    # behaviour policy's difference goes into the importance weights
    assert all(h["ratio_dev_before_update"] < 1e-5 for h in history)
    assert history[0]["stale_fraction"] == 0 and "importance_weight_mean" not in history[0]
    assert all(h["stale_fraction"] == 1 and h["importance_weight_mean"] != 1.0 for h in history[1:])
    assert [h["policy_version"] for h in history] == [1.0, 2.0, 3.0]


def test_a_run_that_fails_to_start_leaves_no_folder(ray_config, tmp_path):
    with pytest.raises(RayActorError, match="lora.target_modules"):
        train(ray_config("lora.target_modules=[no_such_layer]", "rollout.num_workers=1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_every_worker(ray_config, tmp_path, monkeypatch):
    def interrupted(self, it):
        raise KeyboardInterrupt

    monkeypatch.setattr(SyncTrainer, "iteration", interrupted)
    total = ray.cluster_resources()["CPU"]
    with pytest.raises(KeyboardInterrupt):
        train(ray_config("rollout.num_workers=1"), tmp_path / "run")
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total  # every actor and placement group is gone
    assert not (tmp_path / "run").exists()  # nothing was logged: nothing is kept
