"""Benchmark: how much one exact policy-gradient update can raise a reward, side by side.

    .venv/bin/python tests/bench/bench_reward_landscape.py [--config deploy/configs/toy_geneval.yaml]
        [--prompt "a photo of two blocks"] [--rewards geneval brightness] [--images 256]
        [--window 0,2] [--set KEY=VALUE ...]

Why: GRPO raises a reward only when an update along its policy gradient raises it by
more than the update's noise costs. This measures both for one prompt, on the config's
model with a fresh LoRA (the state of iteration 0):

  1. `images` SDE rollouts (sample.noise_level; with --window [a, b) only those steps
     are SDE steps, the rest ODE, as sample.sde_window_size does), rewards made advantages
     A as one group (common.grpo.group_advantages), and the on-policy gradient of the paper's
     objective at ratio 1 without KL, g = -mean_i A_i sum_j grad log p(x_j+1 | x_j),
     over the LoRA parameters; computed on the two halves of the batch too.
  2. cos(g_half1, g_half2): the gradient's signal-to-noise at half the batch (0: all
     noise; for two halves of equal quality cos ~ |E g|^2 / E|g|^2).
  3. E[R] at LoRA = step x g / |g| for each of --steps, every point from the same fixed
     rollout noise (common random numbers: the differences are the policy's, not the
     draw's). The gain at the best step bounds what one update can buy.
  4. The same for the evaluation sampler (ODE, sample.eval_steps, from fixed initial
     noise): whether what the update buys under the rollouts' SDE carries over to the
     images evaluation scores (an SDE with strong early noise can teach a policy to undo
     that noise, which the ODE does not add).
  5. The share of the reward's variance that the initial noise x_T decides: CHUNK SDE
     rollouts from each of 8 initial noises; var(per-x_T mean) / var(reward). The policy
     gradient learns only from what the SDE's noise decides, so a share near 1 would mean
     the rollouts do not explore.

Not part of the test suite: measured, never asserted.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import load_config  # noqa: E402
from common.denoising import encode_prompts, recompute_step, sigma_schedule  # noqa: E402
from common.grpo import group_advantages  # noqa: E402
from common.lora import attach_lora  # noqa: E402
from common.models import Precision, load_pipeline, resolve_device  # noqa: E402
from common.prompts import load_prompts  # noqa: E402
from services.controller.preflight import REPO_ROOT  # noqa: E402
from services.reward.scorers import build_scorer  # noqa: E402
from services.rollout.sampler import initial_noise, sample_ode, sample_sde  # noqa: E402

CHUNK = 64  # images a forward


class Probe:
    def __init__(self, config, prompt: str, window: tuple[int, int] | None):
        self.config, self.prompt, self.window = config, prompt, window
        device = resolve_device(config.model.device)
        self.pipe = load_pipeline(config.model.path, Precision.resolve(config.model.precision, device), device)
        torch.manual_seed(config.run.seed)  # the Gaussian LoRA init draws from torch's global RNG, as the learner's
        self.params = attach_lora(self.pipe.transformer, config.lora)
        records = load_prompts(REPO_ROOT / config.prompts.train, config.prompts.format)
        match = [r for r in records if r.prompt == prompt]
        if not match:
            raise SystemExit(f"--prompt {prompt!r} is not in {config.prompts.train}")
        self.metadata = match[0].metadata
        length = config.model.max_sequence_length
        self.cond = encode_prompts(self.pipe, [prompt] * CHUNK, length)
        self.uncond = encode_prompts(self.pipe, [config.sample.negative_prompt], length).expand(CHUNK)
        self.timesteps, self.sigmas = sigma_schedule(self.pipe.scheduler, config.sample.train_steps, device)
        self.eval_schedule = sigma_schedule(self.pipe.scheduler, config.sample.eval_steps, device)
        self.device = device

    def rollouts(self, seed: int, images: int):
        generator = torch.Generator(self.device).manual_seed(seed)
        s = self.config.sample
        return [sample_sde(self.pipe, self.cond, self.uncond, self.timesteps, self.sigmas,
                           initial_noise(self.pipe, CHUNK, s.resolution, generator),
                           guidance_scale=s.guidance_scale, noise_level=s.noise_level,
                           generator=generator, window=self.window)
                for _ in range(images // CHUNK)]

    def ode_images(self, seed: int, images: int) -> list[np.ndarray]:
        generator = torch.Generator(self.device).manual_seed(seed)
        s = self.config.sample
        return [sample_ode(self.pipe, self.cond, self.uncond, *self.eval_schedule,
                           initial_noise(self.pipe, CHUNK, s.resolution, generator), guidance_scale=s.guidance_scale)
                for _ in range(images // CHUNK)]

    def rewards(self, scorer, batches) -> np.ndarray:
        """Rewards of SDE rollouts or of ODE image arrays, in order."""
        out = [scorer.score(images, [self.prompt] * len(images), [self.metadata] * len(images)).scores
               for images in (getattr(b, "images", b) for b in batches)]
        return np.concatenate(out)

    def gradient(self, chunks, advantages: torch.Tensor) -> torch.Tensor:
        """-mean_i A_i sum_j grad log p_j over the given chunks, flattened."""
        for p in self.params:
            p.grad = None
        steps = range(len(self.timesteps)) if self.window is None else range(*self.window)
        total, s = len(advantages), self.config.sample
        for k, chunk in enumerate(chunks):
            a = advantages[k * CHUNK:(k + 1) * CHUNK]
            for j in steps:
                log_prob = recompute_step(self.pipe.transformer, chunk.latents, j, self.timesteps, self.sigmas,
                                          self.cond, self.uncond, s.guidance_scale, s.noise_level).log_prob
                (-(a * log_prob).sum() / total).backward()
        return torch.cat([p.grad.flatten() for p in self.params])

    def set_lora(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def measure(probe: Probe, scorer, reward: str, images: int, steps: list[float]) -> None:
    base = torch.cat([p.detach().flatten() for p in probe.params]).clone()
    started = time.perf_counter()
    chunks = probe.rollouts(1, images)
    r = probe.rewards(scorer, chunks)
    advantages = torch.tensor(group_advantages(r, np.zeros(len(r)), clip=np.inf).advantages,
                              dtype=torch.float32)  # one group, unclipped: the exact policy gradient
    half = len(chunks) // 2
    first = probe.gradient(chunks[:half], advantages[:half * CHUNK])
    second = probe.gradient(chunks[half:], advantages[half * CHUNK:])
    g = (first + second) / 2  # each half's mean gradient; the whole batch's is their average
    cos = torch.nn.functional.cosine_similarity(first, second, dim=0).item()
    direction = -g / g.norm()  # ascent: the loss is -A log p
    sde, ode = [], []
    for step in [0.0, *steps]:
        probe.set_lora(base + step * direction)
        sde.append(probe.rewards(scorer, probe.rollouts(2, images)).mean())
        ode.append(probe.rewards(scorer, probe.ode_images(3, images)).mean())
    probe.set_lora(base)

    def points(values):
        return "  ".join(f"{step:+g}: {value - values[0]:+.3f}" for step, value in zip(steps, values[1:]))
    print(f"{reward:>12}: batch mean {r.mean():.3f}, within-batch std {r.std():.3f}; "
          f"cos(half, half) {cos:.2f}; {time.perf_counter() - started:.0f} s\n"
          f"{'':>14}SDE E[R] {sde[0]:.3f}, change at step norm {points(sde)}\n"
          f"{'':>14}ODE E[R] {ode[0]:.3f}, change at step norm {points(ode)}", flush=True)


def initial_noise_share(probe: Probe, scorer, noises: int = 8) -> None:
    generator = torch.Generator(probe.device).manual_seed(4)
    s = probe.config.sample
    rewards = []
    for _ in range(noises):
        x = initial_noise(probe.pipe, 1, s.resolution, generator).expand(CHUNK, -1, -1, -1).clone()
        rollout = sample_sde(probe.pipe, probe.cond, probe.uncond, probe.timesteps, probe.sigmas, x,
                             guidance_scale=s.guidance_scale, noise_level=s.noise_level,
                             generator=generator, window=probe.window)
        rewards.append(probe.rewards(scorer, [rollout]))
    means = np.array([r.mean() for r in rewards])
    print(f"{'':>14}initial noise's share of the variance ({noises} x_T x {CHUNK} SDE draws): "
          f"{means.var() / np.concatenate(rewards).var():.0%} (per-x_T means {np.round(means, 2).tolist()})",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "deploy" / "configs" / "toy_geneval.yaml"))
    parser.add_argument("--prompt", default="a photo of two blocks")
    parser.add_argument("--rewards", nargs="+", default=["geneval", "brightness"])
    parser.add_argument("--images", type=int, default=256, help=f"a multiple of {2 * CHUNK}")
    parser.add_argument("--steps", type=float, nargs="+", default=[-1.0, -0.3, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--window", default=None, help="a,b: SDE steps [a, b) only (default: every step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.images % (2 * CHUNK):
        parser.error(f"--images must be a multiple of {2 * CHUNK}, got {args.images}")
    window = tuple(int(v) for v in args.window.split(",")) if args.window else None
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    probe = Probe(config, args.prompt, window)
    print(f"{args.prompt!r}, {args.images} images, noise level {config.sample.noise_level}, "
          f"SDE steps {window or 'all'}, LoRA {len(probe.params)} tensors "
          f"({sum(p.numel() for p in probe.params)} parameters) on {', '.join(config.lora.target_modules)}")
    for reward in args.rewards:
        scorer = build_scorer(reward, config.reward)
        measure(probe, scorer, reward, args.images, args.steps)
        initial_noise_share(probe, scorer)


if __name__ == "__main__":
    main()
