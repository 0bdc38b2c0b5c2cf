"""One GRPO iteration's steps that do not depend on Ray, shared by the distributed
loop and the one-process iteration (tests, debugging a config on one machine)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from common import wire
from common.config import TrainConfig
from common.grpo import group_advantages
from common.prompts import PromptRecord


def assign_advantages(data: pa.Table, train: TrainConfig) -> tuple[pa.Table, dict[str, float]]:
    """Group-relative advantages from the weighted `reward` column, grouped by
    `prompt_index` (DESIGN.md §1), and the statistics the run logs."""
    out = group_advantages(data.column("reward").to_numpy(), data.column("prompt_index").to_numpy(),
                           global_std=train.global_std, clip=train.adv_clip_max)
    stats = {
        "advantage_mean": float(np.mean(out.advantages)),
        "advantage_std": float(np.std(out.advantages)),
        "advantage_abs_max": float(np.max(np.abs(out.advantages))),
        "zero_std_group_fraction": out.zero_std_fraction,
        "group_std_mean": out.mean_group_std,
    }
    return wire.with_advantages(data, out.advantages), stats


def reward_stats(data: pa.Table) -> dict[str, float]:
    """Mean and std of the total reward and of each scorer's reward."""
    stats = {"reward_mean": float(np.mean(data.column("reward").to_numpy())),
             "reward_std": float(np.std(data.column("reward").to_numpy()))}
    rewards = data.column("rewards").combine_chunks()
    for field in rewards.type:
        values = rewards.field(field.name).to_numpy()
        stats[f"reward/{field.name}_mean"] = float(np.mean(values))
        stats[f"reward/{field.name}_std"] = float(np.std(values))
    return stats


def run_local_iteration(rollout, reward, learner, draws: Sequence[tuple[int, PromptRecord]], seed: int,
                        train: TrainConfig) -> tuple[pa.Table, dict[str, float]]:
    """Rollout, score, advantages, update and weight sync, all in this process.

    `rollout`, `reward` and `learner` are the plain worker classes (RolloutWorker,
    RewardWorker, Learner); `draws` are (group key, prompt) pairs from a PromptStream."""
    batch = rollout.generate([r.prompt for _, r in draws], [i for i, _ in draws], [r.metadata for _, r in draws], seed)
    scored, failures = reward.score(batch)
    data, stats = assign_advantages(wire.concat([scored]), train)
    stats.update(reward_stats(data), groups_failed=float(len(failures)))
    stats.update(learner.train(data))
    rollout.set_weights(learner.weights())
    return data, stats
