"""Benchmark: one Flow-GRPO iteration in one process on the tiny model, phase by phase,
and the learner's CFG strategy measured side by side.

    .venv/bin/python tests/bench/bench_iteration.py [--preset s|m] [--repeats 5]

Prints seconds per phase (rollout, score, advantages, learn, weight sync) and the learner
time with each `train.cfg_gradient`: `joint` (the default and the paper's: one 2B forward,
backward through both branches) and `detached` (the unconditional branch alone under
no_grad), each trained on the same batches.
Not part of the test suite: speed is measured here, never asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import wire  # noqa: E402
from common.config import load_config  # noqa: E402
from common.models import make_tiny_model  # noqa: E402
from common.prompts import PromptRecord, PromptStream  # noqa: E402
from services.controller.iteration import assign_advantages  # noqa: E402
from services.learner.learner import Learner  # noqa: E402
from services.reward.worker import RewardWorker  # noqa: E402
from services.rollout.worker import RolloutWorker  # noqa: E402

PROMPTS = [PromptRecord(p) for p in ["a red cat", "a blue dog", "a green car", "a yellow bus"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="s", choices=["s", "m"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_tiny_model(tempfile.mkdtemp() + "/tiny", args.preset)
    overrides = [
        f"model.path={model}", "model.max_sequence_length=16", f"sample.resolution={args.resolution}",
        "sample.group_size=8", "sample.prompts_per_iteration=4", "sample.batch_size=16",
        "train.micro_batch_size=16", "lora.rank=8", "lora.alpha=16", "reward.weights={brightness: 1.0}"]
    config = load_config(None, overrides)
    rollout, reward, learner = RolloutWorker(config), RewardWorker(config.reward), Learner(config)
    detached = Learner(load_config(None, overrides + ["train.cfg_gradient=detached"]))
    stream = PromptStream(PROMPTS, 0)
    phases = {k: [] for k in ["rollout", "score", "advantages", "learn", "weight_sync", "learn_detached_cfg"]}
    for it in range(args.repeats + 1):
        draws = stream.next_batch(config.sample.prompts_per_iteration)
        t0 = time.perf_counter()
        batch = rollout.generate([r.prompt for _, r in draws], [i for i, _ in draws], [{}] * len(draws), seed=it)
        t1 = time.perf_counter()
        scored, _ = reward.score(batch)
        t2 = time.perf_counter()
        data, _ = assign_advantages(wire.concat([scored]), config.train)
        t3 = time.perf_counter()
        learner.train(data, batch)
        t4 = time.perf_counter()
        rollout.set_weights(learner.weights())
        t5 = time.perf_counter()
        detached.train(data, batch)
        t6 = time.perf_counter()
        if it:  # the first iteration warms up
            for name, value in zip(phases, [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5]):
                phases[name].append(value)
    images = config.sample.group_size * config.sample.prompts_per_iteration
    print(f"tiny '{args.preset}', {images} images of {args.resolution} px, {config.sample.train_steps} steps, "
          f"median of {args.repeats}:")
    for name, values in phases.items():
        print(f"  {name:18s} {statistics.median(values):.3f} s")
    iteration = sum(statistics.median(phases[k]) for k in ["rollout", "score", "advantages", "learn", "weight_sync"])
    print(f"  iteration        {iteration:.3f} s")
    ratio = statistics.median(phases["learn_detached_cfg"]) / statistics.median(phases["learn"])
    print(f"learner time, cfg_gradient detached / joint: {ratio:.2f}")


if __name__ == "__main__":
    main()
