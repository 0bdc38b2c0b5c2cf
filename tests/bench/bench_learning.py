"""Benchmark: how far GRPO moves each image reward on the tiny model, side by side.

    .venv/bin/python tests/bench/bench_learning.py [--iterations 40] [--rewards brightness jpeg_compressibility]
        [--set KEY=VALUE ...]

Runs the one-process iteration (RolloutWorker, RewardWorker, Learner: the code the
Ray job runs) from the same seed for each reward, and prints the gain between the
first and last quarter of the iterations, in within-group standard deviations, with
the seconds per iteration. A gain near 0 means the tiny model cannot learn that reward.
Not part of the test suite: speed and learning are measured here, never asserted.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import load_config  # noqa: E402
from common.models import make_tiny_model  # noqa: E402
from common.prompts import load_prompts, PromptStream  # noqa: E402
from services.controller.iteration import run_local_iteration  # noqa: E402
from services.controller.preflight import REPO_ROOT  # noqa: E402
from services.learner.learner import Learner  # noqa: E402
from services.reward.worker import RewardWorker  # noqa: E402
from services.rollout.worker import RolloutWorker  # noqa: E402


def run(reward: str, iterations: int, overrides: list[str], model: str) -> tuple[float, float, float, float]:
    config = load_config(REPO_ROOT / "deploy" / "configs" / "tiny_cpu.yaml",
                         [f"model.path={model}", f"reward.weights={{{reward}: 1.0}}", *overrides])
    rollout, scorer, learner = RolloutWorker(config), RewardWorker(config.reward), Learner(config)
    rollout.set_weights(learner.weights())
    stream = PromptStream(load_prompts(REPO_ROOT / config.prompts.train, config.prompts.format), config.run.seed)
    means, stds, start = [], [], time.perf_counter()
    for it in range(iterations):
        _, stats = run_local_iteration(rollout, scorer, learner, stream.next_batch(config.sample.prompts_per_iteration),
                                       seed=config.run.seed * 100_003 + it, train=config.train)
        means.append(stats["reward_mean"])
        stds.append(stats["group_std_mean"])
    k = max(1, iterations // 4)
    first, last, group_std = np.mean(means[:k]), np.mean(means[-k:]), np.mean(stds[:k])
    return first, last, (last - first) / group_std, (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--rewards", nargs="+", default=["brightness", "jpeg_compressibility"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = str(make_tiny_model(tempfile.mkdtemp() + "/tiny", "s"))
    print(f"tiny_cpu.yaml {' '.join(args.overrides)}, {args.iterations} iterations, first vs last quarter:")
    for reward in args.rewards:
        first, last, gain, seconds = run(reward, args.iterations, args.overrides, model)
        print(f"  {reward:22s} {first:+.5f} -> {last:+.5f}  gain {gain:+.2f} group stds  {seconds:.2f} s/iteration")


if __name__ == "__main__":
    main()
