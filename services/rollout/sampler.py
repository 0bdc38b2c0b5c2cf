"""The denoising loops: the Flow-GRPO SDE sampler that records what the learner needs,
and the deterministic ODE sampler for evaluation ("denoising reduction": fewer steps
for training rollouts than for evaluation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common.denoising import PromptEmbeds, guided_velocity
from common.sde import sde_step_with_logprob


@dataclass
class SdeRollout:
    latents: torch.Tensor    # [B, T + 1, C, h, w] float32: x_0 (noise) .. x_T, as the model consumed them
    log_probs: torch.Tensor  # [B, T] float32
    images: np.ndarray       # [B, H, W, 3] uint8


def initial_noise(pipe, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """x_0 ~ N(0, I) of the latent shape, drawn in float32 (the same numbers in every
    precision), stored in the transformer's dtype."""
    size = resolution // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    noise = torch.randn((batch, channels, size, size), generator=generator, dtype=torch.float32,
                        device=generator.device)
    return noise.to(pipe.transformer.device, pipe.transformer.dtype)


@torch.no_grad()
def sample_sde(pipe, cond: PromptEmbeds, uncond: PromptEmbeds, timesteps: torch.Tensor, sigmas: torch.Tensor,
               x: torch.Tensor, *, guidance_scale: float, noise_level: float,
               generator: torch.Generator, window: tuple[int, int] | None = None,
               on_step: Callable[[], None] | None = None) -> SdeRollout:
    """Sample one batch with the SDE from the initial noise `x`, recording latents and
    per-step log-probs (each step's noise drawn from `generator`). With a `window`
    [start, end), only its steps are SDE steps; the others are ODE steps, whose
    log-prob is recorded as NaN (they are not trained). `on_step` is called after every
    step (the worker's progress, which the controller's hung-worker check reads).

    Each drawn x_{j+1} is first rounded to the model's dtype, the tensor the model
    consumes next and the one stored, and its log-prob is taken of that rounded value,
    so the learner can recompute it exactly from the stored latents."""
    dtype = pipe.transformer.dtype
    latents, log_probs = [x], []
    for j, t in enumerate(timesteps):
        v = guided_velocity(pipe.transformer, x, t, cond, uncond, guidance_scale)
        if on_step is not None:
            on_step()
        if window is not None and not window[0] <= j < window[1]:
            x = (x.float() + v.float() * (sigmas[j + 1] - sigmas[j])).to(dtype)
            latents.append(x)
            log_probs.append(torch.full((len(x),), float("nan"), device=x.device))
            continue
        step = sde_step_with_logprob(v, x, sigmas, j, noise_level, generator=generator)
        x = step.prev_sample.to(dtype)
        log_prob = step.log_prob
        if dtype != torch.float32:
            log_prob = sde_step_with_logprob(v, latents[-1], sigmas, j, noise_level, prev_sample=x).log_prob
        latents.append(x)
        log_probs.append(log_prob)
    return SdeRollout(torch.stack(latents, dim=1).float(), torch.stack(log_probs, dim=1), decode(pipe, x))


@torch.no_grad()
def sample_ode(pipe, cond: PromptEmbeds, uncond: PromptEmbeds, timesteps: torch.Tensor, sigmas: torch.Tensor,
               x: torch.Tensor, *, guidance_scale: float) -> np.ndarray:
    """The deterministic Euler ODE sampler (x + v dt) used for evaluation, from the
    initial noise `x`."""
    for j, t in enumerate(timesteps):
        v = guided_velocity(pipe.transformer, x, t, cond, uncond, guidance_scale).float()
        x = (x.float() + v * (sigmas[j + 1] - sigmas[j])).to(pipe.transformer.dtype)
    return decode(pipe, x)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """Latents to uint8 RGB images [B, H, W, 3] with SD3's VAE scaling and shift."""
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z, return_dict=False)[0]
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
