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
from services.controller.run_folder import reward_summary


def assign_advantages(data: pa.Table, train: TrainConfig) -> tuple[pa.Table, dict[str, float]]:
    """Group-relative advantages from the weighted `reward` column, grouped by
    `prompt_index` (DESIGN.md §1.4), and the statistics the run logs."""
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
    """Mean and std of the weighted total (`reward_mean`, `reward_std`) and, under
    `reward/<name>/mean|std`, of each scorer's reward (and of the total when there are
    several scorers)."""
    total = data.column("reward").to_numpy()
    rewards = data.column("rewards").combine_chunks()
    per_name = {field.name: rewards.field(field.name).to_numpy() for field in rewards.type}
    if len(per_name) > 1:
        per_name["total"] = total
    return {"reward_mean": float(np.mean(total)), "reward_std": float(np.std(total)), **reward_summary(per_name)}


def run_local_iteration(rollout, reward, learner, draws: Sequence[tuple[int, PromptRecord]], seed: int,
                        train: TrainConfig) -> tuple[pa.Table, dict[str, float]]:
    """Rollout, score, advantages, update and weight sync, all in this process.

    `rollout`, `reward` and `learner` are the plain worker classes (RolloutWorker,
    RewardWorker, Learner); `draws` are (group key, prompt) pairs from a PromptStream."""
    batch = rollout.generate([r.prompt for _, r in draws], [i for i, _ in draws], [r.metadata for _, r in draws], seed)
    scored, failures = reward.score(batch)
    data, stats = assign_advantages(wire.concat([scored]), train)
    stats.update(reward_stats(data), groups_failed=float(len(failures)))
    stats.update(learner.train(data, batch))
    rollout.set_weights(learner.weights())
    return data, stats
