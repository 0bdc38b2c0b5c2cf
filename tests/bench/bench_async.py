"""Benchmark: sync against async (run.max_staleness 1 and 2), rollout workers 1 against 2,
and recovery, on a local Ray cluster with the tiny model (one torch thread per worker).

    .venv/bin/python tests/bench/bench_async.py [--iterations 10] [--seeds 3]

Prints, side by side: seconds per iteration (median after the first two) with one
rollout worker and one learner at equal work (an SDE window of 3 of the 6 steps, so that
rollout and update take about as long), the reward gain per sampled image
((mean reward of the last 3 iterations - of the first 3) / images sampled) per mode over
the seeds, rollout images/s with 1 and 2 workers, and the seconds from SIGKILLing a
rollout worker's process, and the learner's, to the next completed iteration.
Not part of the test suite: speed is measured here, never asserted.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from common.config import load_config  # noqa: E402
from common.models import make_tiny_model  # noqa: E402
from services.controller.async_trainer import AsyncTrainer  # noqa: E402
from services.controller.preflight import prepare  # noqa: E402
from services.controller.trainer import SyncTrainer  # noqa: E402

PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "pickscore.txt"


def config(model: Path, *overrides: str):
    return prepare(load_config(None, [
        f"model.path={model}", "model.max_sequence_length=16", "sample.resolution=32", "sample.train_steps=6",
        "sample.sde_window_size=3", "sample.sde_window_range=[0,5]",
        "sample.group_size=4", "sample.prompts_per_iteration=4", "sample.batch_size=4", "train.micro_batch_size=4",
        "lora.rank=4", "lora.alpha=8", "reward.weights={brightness: 1.0}", "run.num_torch_threads=1",
        f"prompts.train={PROMPTS}", "prompts.format=text", "rollout.num_workers=1", "rollout.num_gpus=0",
        "rollout.num_cpus=1", "learner.num_gpus=0", "learner.num_cpus=1", "reward.num_cpus=0.5",
        "run.checkpoint_every=0", "run.sample_images_every=0", "train.learning_rate=1e-2", *overrides]))


class Timed:
    """Records when each iteration completes; SIGKILLs a worker's process as iteration
    `kill_at` starts (`kill`: "rollout" or "learner"; async: the rollout worker holds the
    calls launched ahead)."""
    kill, kill_at = None, 3

    def iteration(self, it):
        if it == self.kill_at and self.kill and not hasattr(self, "killed_at"):
            pid = (self.learner.pids()[0] if self.kill == "learner" else
                   ray.get(self.rollouts[0].actor.__ray_call__.remote(lambda worker: os.getpid())))
            os.kill(pid, signal.SIGKILL)
            self.killed_at = time.perf_counter()
        metrics = super().iteration(it)
        self.completed = getattr(self, "completed", []) + [time.perf_counter()]
        return metrics


class TimedSync(Timed, SyncTrainer):
    """The sync loop, with Timed's kill and clock."""


class TimedAsync(Timed, AsyncTrainer):
    """The async loop, with Timed's kill and clock."""


def run(cfg, kill=None):
    cls = TimedAsync if cfg.run.mode == "async" else TimedSync
    with tempfile.TemporaryDirectory() as tmp:
        trainer = cls(cfg, Path(tmp) / "run")
        trainer.kill = kill
        trainer.start()
        try:
            history = trainer.train()
        finally:
            trainer.stop()
    recovery = None
    if kill:
        recovery = min(t for t in trainer.completed if t > trainer.killed_at) - trainer.killed_at
    return history, recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recovery-only", action="store_true", help="only the seconds to recover")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", preset="s", seed=0)
    n = args.iterations
    modes = {"sync": ["run.mode=sync"], "async k=1": ["run.mode=async", "run.max_staleness=1"],
             "async k=2": ["run.mode=async", "run.max_staleness=2"]}
    if not args.recovery_only:
        print(f"{'mode':<10} {'s/iteration':>12} {'rollout s':>10} {'learn s':>8} {'learner idle':>13} "
              f"{'reward gain/image (x1e-4), seeds':>34}")
    base = None
    for name, overrides in ({} if args.recovery_only else modes).items():
        times, gains, parts = [], [], {}
        for seed in range(args.seeds):
            history, _ = run(config(model, f"run.iterations={n}", f"run.seed={seed}", *overrides))
            if seed == 0:
                times = [h["time/iteration"] for h in history[2:]]
                parts = {k: statistics.median(h.get(k, 0.0) for h in history[2:])
                         for k in ("time/rollout", "time/learn", "time/learner_idle")}
            rewards = [h["reward_mean"] for h in history]
            images = sum(h["images"] for h in history)
            gains.append((statistics.mean(rewards[-3:]) - statistics.mean(rewards[:3])) / images * 1e4)
        per_it = statistics.median(times)
        base = base or per_it
        print(f"{name:<10} {per_it:>8.3f} ({per_it / base:.2f}x) {parts['time/rollout']:>7.3f} "
              f"{parts['time/learn']:>8.3f} {parts['time/learner_idle']:>13.3f}   "
              f"{statistics.mean(gains):+.2f} ({', '.join(f'{g:+.2f}' for g in gains)})")
    for workers in () if args.recovery_only else (1, 2):
        history, _ = run(config(model, f"run.iterations={n}", f"rollout.num_workers={workers}",
                                "rollout.num_cpus=0.5"))
        ips = statistics.median(h["images_per_second"] for h in history[2:])
        print(f"rollout throughput, {workers} worker(s): {ips:.1f} images/s")
    for kill in ("rollout", "learner"):
        _, seconds = run(config(model, f"run.iterations={n}", "run.mode=async", "run.checkpoint_every=2",
                                "rollout.num_workers=2", "rollout.num_cpus=0.5"), kill=kill)
        print(f"killed {kill} (SIGKILL at iteration 3) -> next completed iteration: {seconds:.1f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
