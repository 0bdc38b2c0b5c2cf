"""GRPO math: group-relative advantages and the clipped policy loss (DESIGN.md §1.4, §1.5, §1.6)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Advantages(NamedTuple):
    advantages: np.ndarray         # [N] float64, clipped
    zero_std_groups: np.ndarray    # group ids whose rewards are all equal
    zero_std_fraction: float       # share of groups with zero std
    mean_group_std: float


def group_advantages(rewards, group_ids, global_std: bool = True, clip: float = 5.0,
                     eps: float = 1e-4) -> Advantages:
    """A = (r - mean_group(r)) / (std + eps), clipped to [-clip, clip].

    `std` is the population std (ddof 0) of all rewards in the batch when
    `global_std` (the paper's default for its tasks), else of the group. A group whose
    rewards are all equal gets zero advantages; the learner drops such samples.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must be equal 1-D shapes")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards contain NaN or inf: failed scores must be dropped with their group, not passed on")
    groups, inverse, counts = np.unique(group_ids, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=rewards) / counts
    centred = rewards - means[inverse]
    group_std = np.sqrt(np.bincount(inverse, weights=centred**2) / counts)
    std = np.std(rewards) if global_std else group_std[inverse]
    advantages = np.clip(centred / (std + eps), -clip, clip)
    # Equal rewards, tested exactly: a float mean of equal values can leave a residue.
    low, high = np.full(len(groups), np.inf), np.full(len(groups), -np.inf)
    np.minimum.at(low, inverse, rewards)
    np.maximum.at(high, inverse, rewards)
    zero = low == high
    advantages[zero[inverse]] = 0.0
    return Advantages(advantages, groups[zero], float(zero.mean()), float(group_std.mean()))


class PolicyLoss(NamedTuple):
    loss: torch.Tensor          # scalar, to minimise
    ratio: torch.Tensor         # [B]
    clip_fraction: torch.Tensor  # share of ratios outside [1 - eps, 1 + eps]
    approx_kl: torch.Tensor     # 0.5 * mean((logp - logp_old)^2)


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, importance: torch.Tensor | None = None) -> PolicyLoss:
    """PPO's clipped surrogate on one denoising step:
    mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))), ratio = exp(logp - logp_old).

    With `importance` w (the decoupled objective's truncated ratio between the proximal
    and the behaviour policy, per sample, no gradient) each sample's term is weighted:
    mean(w max(...)). Without it the loss is the paper's, untouched."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    surrogate = torch.maximum(unclipped, clipped)
    loss = (surrogate if importance is None else importance.detach() * surrogate).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    return PolicyLoss(loss, ratio.detach(), clip_fraction, approx_kl)
