"""Benchmark: the learner's throughput, side by side, on the tiny model on the CPU.

    .venv/bin/python tests/bench/bench_learner.py [--preset s|m] [--repeats 3]

Prints learner samples/s with 1 and with 2 data-parallel ranks (Ray actors of one torch
thread each, gloo all-reduce), and the learner time with an SDE window of 2 steps
(Flow-GRPO-Fast) against the paper's 9 of 10 steps, each on the same batches. Not part
of the test suite: speed is measured here, never asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from common import wire  # noqa: E402
from common.config import load_config  # noqa: E402
from common.models import make_tiny_model  # noqa: E402
from services.controller.iteration import assign_advantages  # noqa: E402
from services.controller.learner_group import LearnerGroup  # noqa: E402
from services.learner.learner import Learner  # noqa: E402
from services.reward.worker import RewardWorker  # noqa: E402
from services.rollout.worker import RolloutWorker  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a green car", "a yellow bus", "a white horse", "a black bird",
           "a pink cake", "a brown bear"]


def batches(config, window=None):
    """One rollout call per prompt, scored, with advantages."""
    rollout, reward = RolloutWorker(config), RewardWorker(config.reward)
    calls = [rollout.generate([p], [i], [{}], seed=i, sde_window=window) for i, p in enumerate(PROMPTS)]
    data, _ = assign_advantages(wire.concat([reward.score(b)[0] for b in calls]), config.train)
    # the same batch is trained on repeatedly: mark it current for every version, so that
    # each update is on-policy (no proximal recomputation), as in a sync run
    current = pa.array(np.full(data.num_rows, 10**9, dtype=np.int64))
    data = data.set_column(data.schema.get_field_index("policy_version"), "policy_version", current)
    return data, calls, np.repeat(np.arange(len(calls)), config.sample.group_size)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="s", choices=["s", "m"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = make_tiny_model(tempfile.mkdtemp() + "/tiny", args.preset)
    base = [f"model.path={model}", "model.max_sequence_length=16", "sample.resolution=64", "sample.group_size=8",
            "sample.batch_size=8", "train.micro_batch_size=8", "lora.rank=8", "lora.alpha=16",
            "reward.weights={brightness: 1.0}", "run.num_torch_threads=1", "learner.num_gpus=0", "learner.num_cpus=1"]
    images = len(PROMPTS) * 8

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    per_ranks = {}
    for ranks in (1, 2):
        config = load_config(None, base + [f"learner.num_workers={ranks}"])
        data, calls, rows = batches(config)
        refs = [ray.put(b) for b in calls]
        group = LearnerGroup(Learner, config)
        group.ready()
        per_ranks[ranks] = timed(lambda: group.train(data, refs, rows), args.repeats)
        group.stop()
    ray.shutdown()
    print(f"tiny '{args.preset}', {images} images of 64 px, 10 steps, median of {args.repeats}:")
    for ranks, seconds in per_ranks.items():
        print(f"  learner, {ranks} rank(s) of one thread: {seconds:.3f} s, {images / seconds:.1f} samples/s")
    print(f"  speed-up of 2 ranks: {per_ranks[1] / per_ranks[2]:.2f}x")

    windowed = load_config(None, base + ["sample.sde_window_size=2", "sample.sde_window_range=[0, 5]"])
    paper = load_config(None, base)
    seconds = {}
    for name, config, window in (("window", windowed, (1, 3)), ("paper", paper, None)):
        data, calls, _ = batches(config, window)
        learner = Learner(config)
        seconds[name] = timed(lambda: learner.train(data, *calls), args.repeats)
    print(f"  learner, SDE window of 2 steps: {seconds['window']:.3f} s; the paper's 9 of 10 steps: "
          f"{seconds['paper']:.3f} s ({seconds['paper'] / seconds['window']:.2f}x)")


if __name__ == "__main__":
    main()
