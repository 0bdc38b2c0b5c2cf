"""The learner: a plain class (the controller wraps it with `ray.remote`) that holds the
frozen SD3 transformer with the trainable LoRA, and runs the GRPO update on scored
rollout batches (DESIGN.md §1).

For a sample with advantage A and a trained step j (the first floor(timestep_fraction * T)
steps), with the log-prob recomputed under the current weights:

    ratio  = exp(logp_theta(x_{j+1} | x_j) - logp_old)
    policy = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
    kl     = mean((mean_theta - mean_ref)^2 / (2 std_t^2))     reference: LoRA disabled
    loss   = policy + beta kl

Gradients accumulate over the trained steps and the micro-batches of one optimizer
step; the norm is clipped, AdamW steps, the EMA follows.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch
from peft import set_peft_model_state_dict

from common import wire
from common.config import Config
from common.denoising import PromptEmbeds, encode_prompts, guided_velocity, sigma_schedule
from common.grpo import clipped_policy_loss
from common.lora import LoraWeights, adapter_disabled, attach_lora, export_lora, lora_state_dict
from common.models import Precision, load_pipeline, resolve_device
from common.sde import kl_to_reference, sde_step_with_logprob
from services.learner import state as learner_state
from services.learner.ema import LoraEma


class Learner:
    def __init__(self, config: Config):
        self.config = config
        if config.run.num_torch_threads:
            torch.set_num_threads(config.run.num_torch_threads)
        self.device = resolve_device(config.model.device)
        self.pipe = load_pipeline(config.model.path, Precision.resolve(config.model.precision, self.device), self.device,
                                  with_vae=False)
        self.transformer = self.pipe.transformer
        with torch.random.fork_rng(devices=[]):  # the Gaussian LoRA init draws from torch's global RNG
            torch.manual_seed(config.run.seed)
            self.params = attach_lora(self.transformer, config.lora)
        t = config.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                           weight_decay=t.weight_decay, eps=t.adam_eps)
        self.ema = LoraEma(self.params, t.ema_decay, t.ema_every) if t.ema else None
        self.version = 0
        self.negative = encode_prompts(self.pipe, [config.sample.negative_prompt], config.model.max_sequence_length)
        self.timesteps, self.sigmas = sigma_schedule(self.pipe.scheduler, config.sample.train_steps, self.device)
        self.trained_steps = int(t.timestep_fraction * config.sample.train_steps)
        self.generator = torch.Generator().manual_seed(config.run.seed)

    def ready(self) -> int:
        return self.version

    def weights(self, ema: bool = False) -> LoraWeights:
        """The current LoRA as versioned bytes; with `ema`, the EMA weights (evaluation
        and the final adapter)."""
        if ema and self.ema is not None:
            with self.ema.applied():
                return export_lora(self.transformer, self.version)
        return export_lora(self.transformer, self.version)

    def train(self, data: pa.Table, *rollouts: pa.RecordBatch) -> dict[str, float]:
        """One GRPO update on a scored batch with advantages (no latents) and the rollout
        batches its rows came from (their latents); bumps the policy version."""
        start = time.perf_counter()
        cfg, t = self.config, self.config.train
        advantages = data.column("advantage").to_numpy()
        keep = np.flatnonzero(advantages != 0)  # zero-std groups carry no signal
        if len(keep) == 0:
            self.version += 1
            return {"samples_trained": 0.0, "learn_seconds": time.perf_counter() - start}
        steps = self.trained_steps
        latents = torch.from_numpy(wire.join_latents(data, rollouts)[keep, : steps + 1]).to(self.device)
        data = data.take(pa.array(keep))
        old_log_probs = torch.tensor(wire.list_column(data, "log_probs")[:, :steps], device=self.device)
        adv = torch.from_numpy(advantages[keep]).float().to(self.device)
        self._check_timesteps(wire.list_column(data, "timesteps"))
        prompts = data.column("prompt").to_pylist()
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        embeds = encode_prompts(self.pipe, list(unique), cfg.model.max_sequence_length)
        rows = torch.tensor([unique[p] for p in prompts])

        # Metrics stay tensors on the device until the end: no GPU sync per step.
        sums: dict[str, torch.Tensor] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        first_step_ratio_dev = torch.zeros((), device=self.device)
        for epoch in range(t.inner_epochs):
            order = torch.randperm(len(keep), generator=self.generator)
            for k, chunk in enumerate(order.tensor_split(t.optimizer_steps_per_iteration)):
                if len(chunk) == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                for mb in chunk.split(t.micro_batch_size):
                    weight = len(mb) / len(chunk) / steps
                    for name, value in self._accumulate(latents[mb], old_log_probs[mb], adv[mb],
                                                        embeds.select(rows[mb]), weight).items():
                        sums[name] += value
                        counts[name] += 1
                        if epoch == 0 and k == 0 and name == "ratio_dev":
                            first_step_ratio_dev = torch.maximum(first_step_ratio_dev, value)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.step()
                sums["grad_norm"] += grad_norm.detach()
                counts["grad_norm"] += 1
        self.version += 1
        sums.pop("ratio_dev")
        metrics = {name: float(sums[name]) / counts[name] for name in sums}
        metrics.update(ratio_dev_before_update=float(first_step_ratio_dev), samples_trained=float(len(keep)),
                       learn_seconds=time.perf_counter() - start)
        return metrics

    def _accumulate(self, latents, old_log_probs, adv, cond: PromptEmbeds, weight: float) -> dict[str, torch.Tensor]:
        """Backward the loss of one micro-batch over every trained step, scaled by `weight`;
        return its metrics (means over the steps) as detached tensors."""
        t, s = self.config.train, self.config.sample
        uncond = self.negative.expand(len(adv))
        dtype = self.transformer.dtype
        n = self.trained_steps
        out: dict[str, torch.Tensor] = defaultdict(float)
        out["ratio_dev"] = torch.zeros((), device=latents.device)
        for j in range(self.trained_steps):
            x, x_next = latents[:, j].to(dtype), latents[:, j + 1].to(dtype)
            v = guided_velocity(self.transformer, x, self.timesteps[j], cond, uncond, s.guidance_scale,
                                detach_uncond=t.cfg_gradient == "detached")
            step = sde_step_with_logprob(v, x, self.sigmas, j, s.noise_level, prev_sample=x_next)
            policy = clipped_policy_loss(step.log_prob, old_log_probs[:, j], adv, t.clip_range)
            loss = policy.loss
            if t.beta > 0:
                with torch.no_grad(), adapter_disabled(self.transformer):
                    v_ref = guided_velocity(self.transformer, x, self.timesteps[j], cond, uncond, s.guidance_scale)
                    ref_mean = sde_step_with_logprob(v_ref, x, self.sigmas, j, s.noise_level,
                                                     prev_sample=x_next).prev_sample_mean
                kl = kl_to_reference(step.prev_sample_mean, ref_mean, step.std_dev)
                loss = loss + t.beta * kl
                out["kl"] += kl.detach() / n
            (loss * weight).backward()
            out["loss"] += loss.detach() / n
            out["policy_loss"] += policy.loss.detach() / n
            out["clip_fraction"] += policy.clip_fraction / n
            out["approx_kl"] += policy.approx_kl / n
            out["ratio_dev"] = torch.maximum(out["ratio_dev"], (policy.ratio - 1).abs().max())
        return out

    def _check_timesteps(self, timesteps: np.ndarray) -> None:
        expected = self.timesteps.cpu().numpy()
        if timesteps.shape[1] != len(expected) or not np.allclose(timesteps, expected, rtol=0, atol=1e-3):
            raise ValueError(f"rollout timesteps {timesteps[0][:3]}... differ from the learner's schedule "
                             f"{expected[:3]}...: rollout and learner must share sample.train_steps")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[bytes, dict]:
        """The state a resumed run needs (LoRA, optimizer, EMA, RNG, version) as
        safetensors bytes and a JSON-able dict (services/learner/state.py): no pickle."""
        return learner_state.pack({
            "version": self.version,
            "lora": {k: v.detach().cpu() for k, v in lora_state_dict(self.transformer).items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
        })

    def load_state_dict(self, tensors: bytes, meta: dict) -> None:
        state = learner_state.unpack(tensors, meta)
        set_peft_model_state_dict(self.transformer, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]
