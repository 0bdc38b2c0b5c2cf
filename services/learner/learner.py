"""The learner: a plain class (the controller wraps it with `ray.remote`) that holds the
frozen SD3 transformer with the trainable LoRA, and runs the GRPO update on scored
rollout batches (DESIGN.md §1).

For a sample with advantage A and a trained step j (the first floor(timestep_fraction * T)
steps), with the log-prob recomputed under the current weights:

    ratio  = exp(logp_theta(x_{j+1} | x_j) - logp_old)
    policy = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
    kl     = mean((mean_theta - mean_ref)^2 / (2 std_t^2))     reference: LoRA disabled
    loss   = policy + beta kl

On-policy samples (the paper's sync loop) use logp_old = the rollout's log-prob. Samples
of an older policy version (async mode) use the decoupled objective of AReaL: the ratio
is taken against the proximal policy, the weights at the start of this update
(logp_prox, recomputed without gradient), and weighted by the truncated importance
ratio between proximal and behaviour policy,

    policy = mean(w max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))),
    ratio = exp(logp_theta - logp_prox),  w = min(exp(logp_prox - logp_behaviour), cap)

so a clip range of 1e-4 clips against the policy being improved, not against a stale
one (which would put most ratios outside the clip and silence the policy term). With
no stale sample, logp_prox = logp_behaviour and w = 1: the paper's loss exactly.

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
        batches its rows came from (their latents); bumps the policy version.

        Micro-batches are the rollout's own denoising batches (`forward_batch`), rows in
        sampling order, cut to `train.micro_batch_size`: with the default sizes the
        learner's forward is the very forward the rollout ran, so the first step's ratio
        is 1 in any precision. Their order is shuffled per inner epoch and they are
        split into `train.optimizer_steps_per_iteration` optimizer steps."""
        start = time.perf_counter()
        t = self.config.train
        advantages = data.column("advantage").to_numpy()
        keep = np.flatnonzero(advantages != 0)  # zero-std groups carry no signal
        if len(keep) == 0:
            self.version += 1
            return {"samples_trained": 0.0, "learn_seconds": time.perf_counter() - start}
        steps = self.trained_steps
        latents = torch.from_numpy(wire.join_latents(data, rollouts)[keep, : steps + 1])  # to the device per micro-batch
        data = data.take(pa.array(keep))
        self._check_timesteps(wire.list_column(data, "timesteps"))
        behaviour = torch.from_numpy(wire.list_column(data, "log_probs")[:, :steps]).float().to(self.device)
        adv = torch.from_numpy(advantages[keep]).float().to(self.device)
        prompts = data.column("prompt").to_pylist()
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        embeds = encode_prompts(self.pipe, list(unique), self.config.model.max_sequence_length)
        rows = torch.tensor([unique[p] for p in prompts])
        batches = self._micro_batches(data, rollouts)
        stale = data.column("policy_version").to_numpy() < self.version
        # Decoupled objective (module docstring): only samples of an older policy need the
        # proximal log-probs; on-policy batches use the paper's loss unchanged.
        proximal, weights = behaviour, None
        if stale.any():
            proximal = self._log_probs(latents, embeds.select(rows), batches)
            weights = torch.exp(proximal - behaviour).clamp(max=t.importance_weight_cap)

        # Metrics stay tensors on the device until the end: no GPU sync per step.
        sums: dict[str, torch.Tensor] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        first_step_ratio_dev = torch.zeros((), device=self.device)
        for epoch in range(t.inner_epochs):
            order = torch.randperm(len(batches), generator=self.generator)
            for k, part in enumerate(order.tensor_split(t.optimizer_steps_per_iteration)):
                if len(part) == 0:
                    continue
                step_rows = sum(len(batches[i]) for i in part)
                self.optimizer.zero_grad(set_to_none=True)
                for i in part.tolist():
                    mb = batches[i]
                    metrics = self._accumulate(latents[mb].to(self.device), proximal[mb], adv[mb],
                                               embeds.select(rows[mb]), None if weights is None else weights[mb],
                                               len(mb) / step_rows / steps)
                    for name, value in metrics.items():
                        sums[name] += value
                        counts[name] += 1
                    if epoch == 0 and k == 0:
                        first_step_ratio_dev = torch.maximum(first_step_ratio_dev, metrics["ratio_dev"])
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
                       stale_fraction=float(stale.mean()), learn_seconds=time.perf_counter() - start)
        if weights is not None:
            metrics["importance_weight_mean"] = float(weights.mean())
        return metrics

    def _micro_batches(self, data: pa.Table, rollouts: tuple[pa.RecordBatch, ...]) -> list[torch.Tensor]:
        """Row indices of `data` per rollout denoising batch (the rollout call it came
        from and its `forward_batch`), in sampling order, cut to train.micro_batch_size."""
        call_of = {}
        for call, batch in enumerate(rollouts):
            call_of.update(dict.fromkeys(batch.column("prompt_index").to_pylist(), call))
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, (key, forward) in enumerate(zip(data.column("prompt_index").to_pylist(),
                                                 data.column("forward_batch").to_pylist())):
            groups[(call_of[key], forward)].append(row)
        size = self.config.train.micro_batch_size
        return [torch.tensor(rows[i:i + size]) for rows in groups.values() for i in range(0, len(rows), size)]

    @torch.no_grad()
    def _log_probs(self, latents: torch.Tensor, cond: PromptEmbeds, batches: list[torch.Tensor]) -> torch.Tensor:
        """log p(x_{j+1} | x_j) of every trained step under the current weights (the
        proximal policy of the decoupled objective), by the same micro-batches."""
        out = torch.empty(len(latents), self.trained_steps, device=self.device)
        for mb in batches:
            x = latents[mb].to(self.device)
            for j in range(self.trained_steps):
                out[mb.to(self.device), j] = self._step(x, j, cond.select(mb)).log_prob
        return out

    def _step(self, latents: torch.Tensor, j: int, cond: PromptEmbeds, detach_uncond: bool = False):
        """The SDE step j of `latents` [B, T+1, ...] under the current model, with the
        log-prob of the stored x_{j+1}."""
        s = self.config.sample
        dtype = self.transformer.dtype
        x, x_next = latents[:, j].to(dtype), latents[:, j + 1].to(dtype)
        v = guided_velocity(self.transformer, x, self.timesteps[j], cond, self.negative.expand(len(x)),
                            s.guidance_scale, detach_uncond=detach_uncond)
        return sde_step_with_logprob(v, x, self.sigmas, j, s.noise_level, prev_sample=x_next)

    def _accumulate(self, latents, old_log_probs, adv, cond: PromptEmbeds, importance: torch.Tensor | None,
                    weight: float) -> dict[str, torch.Tensor]:
        """Backward the loss of one micro-batch over every trained step, scaled by `weight`;
        return its metrics (means over the steps) as detached tensors."""
        t = self.config.train
        n = self.trained_steps
        out: dict[str, torch.Tensor] = defaultdict(float)
        out["ratio_dev"] = torch.zeros((), device=latents.device)
        for j in range(n):
            step = self._step(latents, j, cond, detach_uncond=t.cfg_gradient == "detached")
            policy = clipped_policy_loss(step.log_prob, old_log_probs[:, j], adv, t.clip_range,
                                         None if importance is None else importance[:, j])
            loss = policy.loss
            if t.beta > 0:
                with adapter_disabled(self.transformer), torch.no_grad():
                    ref_mean = self._step(latents, j, cond).prev_sample_mean
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
