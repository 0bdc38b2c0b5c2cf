"""The Flow-GRPO SDE step: the ODE sampler turned into an SDE with the same marginals,
and the Gaussian log-density of each step (DESIGN.md §1.2).

Rectified-flow convention: x_t = (1 - t) x_0 + t eps, sigma runs 1 (noise) -> 0 (data),
dt = sigma_next - sigma < 0, and the model predicts the velocity v. With noise level a:

    std_t = a * sqrt(sigma / (1 - sigma'))      sigma' = sigmas[1] if sigma == 1 else sigma
    mean  = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'    = mean + std_t sqrt(-dt) eps
    log p = mean over non-batch dims of log N(x'; mean, (std_t sqrt(-dt))^2)

Everything is computed in float32 whatever the model's dtype. The log-prob is a
per-element mean, not a sum: it sets the scale of the clip range (1e-4). With a = 0
the step is the Euler ODE step x + v dt (its log-prob is then undefined, NaN).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SdeStep(NamedTuple):
    prev_sample: torch.Tensor       # x_{t+dt}, float32
    log_prob: torch.Tensor          # [B], float32
    prev_sample_mean: torch.Tensor  # the Gaussian's mean, float32
    std_dev: torch.Tensor           # std_t, shaped to broadcast against the sample


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    step_index: int | torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SdeStep:
    """One SDE step from `sample` at sigmas[step_index] to sigmas[step_index + 1].

    `sigmas` is the full schedule (1-D, from 1 to 0, length T + 1); `step_index` an int
    or a per-sample integer tensor. When `prev_sample` is given, its log-prob under the
    step's Gaussian is returned (the learner's recomputation); otherwise a sample is
    drawn with `generator`.
    """
    velocity = velocity.float()
    sample = sample.float()
    sigmas = sigmas.to(device=sample.device, dtype=torch.float32)
    index = torch.as_tensor(step_index, device=sample.device, dtype=torch.long).reshape(-1)
    sigma = _per_sample(sigmas[index], sample.ndim)
    sigma_next = _per_sample(sigmas[index + 1], sample.ndim)
    dt = sigma_next - sigma

    sigma_guarded = torch.where(sigma == 1, sigmas[1], sigma)
    std_dev = noise_level * torch.sqrt(sigma / (1 - sigma_guarded))
    prev_sample_mean = (sample * (1 + std_dev**2 / (2 * sigma) * dt)
                        + velocity * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt)
    step_std = std_dev * torch.sqrt(-dt)

    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = prev_sample_mean + step_std * noise
    else:
        prev_sample = prev_sample.detach().float()

    log_prob = (-((prev_sample - prev_sample_mean) ** 2) / (2 * step_std**2)
                - torch.log(step_std) - _LOG_SQRT_2PI)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return SdeStep(prev_sample, log_prob, prev_sample_mean, std_dev)


def kl_to_reference(mean: torch.Tensor, reference_mean: torch.Tensor, std_dev: torch.Tensor) -> torch.Tensor:
    """The paper's KL term between policy and reference (the LoRA-disabled model):
    mean over non-batch dims of (mean - mean_ref)^2 / (2 std_t^2), then over the batch.
    As in the paper's code it divides by std_t^2, not by the step variance std_t^2 |dt|."""
    per_sample = ((mean - reference_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)), keepdim=True)
    return (per_sample / (2 * std_dev**2)).mean()


def sde_window(size: int, window_range: list[int], seed: int) -> tuple[int, int] | None:
    """Flow-GRPO-Fast's window of SDE steps [start, start + size), start drawn uniformly
    from [window_range[0], window_range[1] - size] (upstream's rule); None when size is
    0 (every step is an SDE step)."""
    if not size:
        return None
    start = int(np.random.default_rng(seed).integers(window_range[0], window_range[1] - size + 1))
    return start, start + size
