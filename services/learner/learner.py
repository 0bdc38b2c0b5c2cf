"""The learner: a plain class (the controller wraps it with `ray.remote`) that holds the
frozen SD3 transformer with the trainable LoRA, and runs the GRPO update on scored
rollout batches (the loss: DESIGN.md §1.5 and §1.6; the learner group: DESIGN.md §2.3).

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

import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch
from peft import set_peft_model_state_dict

from common import wire
from common.config import Config, TrainConfig
from common.denoising import PromptEmbeds, recompute_step, sigma_schedule
from common.grpo import clipped_policy_loss
from common.lora import LoraWeights, adapter_disabled, attach_lora, export_lora, lora_state_dict
from common.models import Precision, load_pipeline, resolve_device
from common.sde import kl_to_reference
from services.learner import state as learner_state
from services.learner.ema import LoraEma


def adamw_settings(train: TrainConfig) -> dict:
    """AdamW's settings from `train`: for a new optimizer, and again after a checkpoint's
    optimizer state is loaded, whose saved settings would otherwise override a
    `--resume --set train.learning_rate=...`."""
    return {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2),
            "weight_decay": train.weight_decay, "eps": train.adam_eps}


class Learner:
    def __init__(self, config: Config, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank, self.world_size = rank, world_size
        threads = config.learner.num_torch_threads
        threads = config.run.num_torch_threads if threads is None else threads
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(config.model.device)
        self.pipe = load_pipeline(config.model.path, Precision.resolve(config.model.precision, self.device), self.device,
                                  with_vae=False, with_text_encoders=False)
        self.transformer = self.pipe.transformer
        if config.learner.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        with torch.random.fork_rng(devices=[]):  # the Gaussian LoRA init draws from torch's global RNG
            torch.manual_seed(config.run.seed)
            self.params = attach_lora(self.transformer, config.lora)
        self.optimizer = torch.optim.AdamW(self.params, **adamw_settings(config.train))
        t = config.train
        self.ema = LoraEma(self.params, t.ema_decay, t.ema_every) if t.ema else None
        self.version = 0
        self.negative: PromptEmbeds | None = None  # read from the first rollout batch (no text encoder here)
        self.timesteps, self.sigmas = sigma_schedule(self.pipe.scheduler, config.sample.train_steps, self.device)
        self.paper_steps = list(range(int(t.timestep_fraction * config.sample.train_steps)))  # without a window
        self.generator = torch.Generator().manual_seed(config.run.seed)

    def ready(self) -> int:
        return self.version

    def pid(self) -> int:
        """This process's id (fault tests kill it)."""
        return os.getpid()

    def weights(self, ema: bool = False) -> LoraWeights:
        """The current LoRA as versioned bytes; with `ema`, the EMA weights (evaluation
        and the final adapter)."""
        if ema and self.ema is not None:
            with self.ema.applied():
                return export_lora(self.transformer, self.version)
        return export_lora(self.transformer, self.version)

    def train(self, data: pa.Table, *rollouts: pa.RecordBatch | None, calls: np.ndarray | None = None) -> dict[str, float]:
        """One GRPO update on a scored batch with advantages (no latents) and the rollout
        batches its rows came from (their latents); bumps the policy version.

        Micro-batches are the rollout's own denoising batches (`forward_batch`), rows in
        sampling order, cut to `train.micro_batch_size`: with the default sizes the
        learner's forward is the very forward the rollout ran, so the first step's ratio
        is 1 in any precision. Each inner epoch shuffles them and cuts them into
        `train.optimizer_steps_per_iteration` optimizer steps (`_schedule`).

        In a learner group every rank gets the whole `data` and `calls` (the index into
        `rollouts` of each row's rollout call) but only its own calls' batches (None for
        the others'): all ranks agree on the micro-batches and the steps, each trains its
        own share of every step, and one all-reduce per optimizer step sums the
        gradients, each scaled by the global number of rows in the step. The ranks thus
        take the update one learner takes on the same steps, however zero-advantage
        groups fall (with one optimizer step per iteration: exactly one learner's)."""
        start = time.perf_counter()
        t = self.config.train
        if calls is None:
            calls = wire.rollout_calls(data, rollouts)
        keep = np.flatnonzero(data.column("advantage").to_numpy() != 0)  # zero-std groups carry no signal
        if len(keep) == 0:
            self.version += 1
            return {"samples_trained": 0.0, "learn_seconds": time.perf_counter() - start}
        positions = wire.rows_in_rollouts(data, rollouts, calls)[keep]
        data, calls = data.take(pa.array(keep)), np.asarray(calls)[keep]
        self._check_timesteps(wire.list_column(data, "timesteps"))
        log_probs = wire.list_column(data, "log_probs")
        steps = self._trained_steps(log_probs)
        batches = self._micro_batches(data, calls)
        owners = [int(calls[mb[0]]) % self.world_size for mb in batches]  # rollout call c is rank c mod N's
        mine = [i for i, owner in enumerate(owners) if owner == self.rank]
        latents = {i: self._latents(rollouts[calls[batches[i][0]]], positions[batches[i]], steps[-1] + 2) for i in mine}
        behaviour = torch.from_numpy(log_probs[:, steps]).float().to(self.device)
        adv = torch.tensor(data.column("advantage").to_numpy(), dtype=torch.float32, device=self.device)
        prompts = data.column("prompt").to_pylist()
        embeds = self._prompt_embeds([b for b in rollouts if b is not None])
        cond = {i: PromptEmbeds.cat([embeds[prompts[r]] for r in batches[i].tolist()]) for i in mine}
        stale = data.column("policy_version").to_numpy() < self.version
        # Decoupled objective (module docstring): only samples of an older policy need the
        # proximal log-probs; on-policy batches use the paper's loss unchanged.
        proximal, weights = behaviour, None
        if stale.any():
            proximal = behaviour.clone()
            for i in mine:
                proximal[batches[i].to(self.device)] = self._log_probs(latents[i], cond[i], steps)
            weights = torch.exp(proximal - behaviour).clamp(max=t.importance_weight_cap)

        # Metrics stay tensors on the device until the end: no GPU sync per step.
        sums: dict[str, torch.Tensor] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        first_step_ratio_dev = torch.zeros((), device=self.device)
        for epoch in range(t.inner_epochs):
            for k, part in enumerate(self._schedule(owners)):
                step_rows = sum(len(batches[i]) for i in part)
                if step_rows == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                for i in part:
                    if i not in latents:
                        continue  # another rank's
                    rows = batches[i].to(self.device)
                    metrics = self._accumulate(latents[i], proximal[rows], adv[rows], cond[i],
                                               None if weights is None else weights[rows], steps,
                                               len(rows) / step_rows / len(steps))
                    for name, value in metrics.items():
                        sums[name] += value
                        counts[name] += 1
                    if epoch == 0 and k == 0:
                        first_step_ratio_dev = torch.maximum(first_step_ratio_dev, metrics["ratio_dev"])
                if self.world_size > 1:
                    self._all_reduce_gradients()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.step()
                sums["grad_norm"] += grad_norm.detach()
                counts["grad_norm"] += 1
        self.version += 1
        sums.pop("ratio_dev", None)
        metrics = {name: float(sums[name]) / counts[name] for name in sums}
        metrics.update(ratio_dev_before_update=float(first_step_ratio_dev),
                       samples_trained=float(sum(len(batches[i]) for i in mine)),
                       stale_fraction=float(stale.mean()), learn_seconds=time.perf_counter() - start)
        if weights is not None:
            metrics["importance_weight_mean"] = float(weights.mean())
        return metrics

    def _prompt_embeds(self, rollouts: list[pa.RecordBatch]) -> dict[str, PromptEmbeds]:
        """Prompt -> its text embeddings, as the rollout computed them (the batches'
        `prompt_embeds` column); the negative prompt's too, kept for later updates."""
        out = {}
        for batch in rollouts:
            for prompt, blob in zip(batch.column("prompt").to_pylist(), batch.column("prompt_embeds").to_pylist()):
                if blob is None:
                    continue
                out[prompt], negative = PromptEmbeds.from_bytes(blob, self.device)
                if self.negative is None and negative is not None:
                    self.negative = negative
        return out

    def _trained_steps(self, log_probs: np.ndarray) -> list[int]:
        """The steps to train: the paper's first floor(timestep_fraction x T), or with an
        SDE window (sample.sde_window_size) the window's steps, the only ones the rollout
        gave a log-prob (the same window for every row of an iteration)."""
        if not self.config.sample.sde_window_size:
            return self.paper_steps
        sde = np.isfinite(log_probs)
        steps = np.flatnonzero(sde[0]).tolist()
        if not (sde == sde[0]).all() or len(steps) != self.config.sample.sde_window_size:
            raise ValueError(f"rollout SDE windows {sorted({tuple(np.flatnonzero(r)) for r in sde})} differ from one "
                             f"window of sample.sde_window_size={self.config.sample.sde_window_size} steps")
        return steps

    def _latents(self, rollout: pa.RecordBatch, positions: np.ndarray, steps: int) -> torch.Tensor:
        """The first `steps` latents of some rows of a rollout batch, on the device (one
        micro-batch at a time: the batch's latents stay in the object store)."""
        return torch.from_numpy(wire.tensor_column(rollout, "latents")[positions, :steps]).to(self.device)

    def _schedule(self, owners: list[int]) -> list[list[int]]:
        """One inner epoch's optimizer steps, as micro-batch indices: every rank's
        micro-batches (`owners[i]` is micro-batch i's rank) shuffled and cut into
        train.optimizer_steps_per_iteration slices, step k made of every rank's k-th slice,
        as the paper's script does on each GPU. Every rank draws the same permutations,
        so all agree on the steps; and each rank has its share of every step, so no rank
        waits long at the step's all-reduce."""
        steps: list[list[int]] = [[] for _ in range(self.config.train.optimizer_steps_per_iteration)]
        for rank in range(self.world_size):
            own = [i for i, owner in enumerate(owners) if owner == rank]
            order = torch.randperm(len(own), generator=self.generator)
            for k, part in enumerate(order.tensor_split(len(steps))):
                steps[k].extend(own[j] for j in part.tolist())
        return steps

    def _micro_batches(self, data: pa.Table, calls: np.ndarray) -> list[torch.Tensor]:
        """Row indices of `data` per rollout denoising batch (its rollout call and its
        `forward_batch`), in sampling order, cut to train.micro_batch_size."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, (call, forward) in enumerate(zip(calls.tolist(), data.column("forward_batch").to_pylist())):
            groups[(call, forward)].append(row)
        size = self.config.train.micro_batch_size
        return [torch.tensor(rows[i:i + size]) for rows in groups.values() for i in range(0, len(rows), size)]

    def _all_reduce_gradients(self) -> None:
        """Sum the LoRA gradients of all ranks, in one flat buffer (one collective per
        optimizer step). Each rank's loss is already scaled by the global row count."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(self.params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def join_group(self, address: str, port: int) -> str:
        """Join the learner group's process group (rank 0 listens at address:port) and
        return this rank's LoRA digest, which must equal every other rank's."""
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size)
        return self.digest()

    def digest(self) -> str:
        """sha256 of the LoRA weights (and of the EMA's): equal on every rank of a group."""
        state = export_lora(self.transformer, self.version).sha256
        if self.ema is not None:
            with self.ema.applied():
                state += export_lora(self.transformer, self.version).sha256
        return state

    @torch.no_grad()
    def _log_probs(self, latents: torch.Tensor, cond: PromptEmbeds, steps: list[int]) -> torch.Tensor:
        """log p(x_{j+1} | x_j) of the trained steps of one micro-batch under the current
        weights (the proximal policy of the decoupled objective)."""
        return torch.stack([self._step(latents, j, cond).log_prob for j in steps], dim=1)

    def _step(self, latents: torch.Tensor, j: int, cond: PromptEmbeds, detach_uncond: bool = False):
        """The SDE step j of `latents` [B, T+1, ...] under the current model, with the
        log-prob of the stored x_{j+1}."""
        s = self.config.sample
        return recompute_step(self.transformer, latents, j, self.timesteps, self.sigmas, cond,
                              self.negative.expand(len(latents)), s.guidance_scale, s.noise_level, detach_uncond)

    def _accumulate(self, latents, old_log_probs, adv, cond: PromptEmbeds, importance: torch.Tensor | None,
                    steps: list[int], weight: float) -> dict[str, torch.Tensor]:
        """Backward the loss of one micro-batch over the trained `steps` (old log-probs
        and importance weights given per trained step), scaled by `weight`; return its
        metrics (means over the steps) as detached tensors."""
        t = self.config.train
        n = len(steps)
        out: dict[str, torch.Tensor] = defaultdict(float)
        out["ratio_dev"] = torch.zeros((), device=latents.device)
        for k, j in enumerate(steps):
            step = self._step(latents, j, cond, detach_uncond=t.cfg_gradient == "detached")
            policy = clipped_policy_loss(step.log_prob, old_log_probs[:, k], adv, t.clip_range,
                                         None if importance is None else importance[:, k])
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
        for group in self.optimizer.param_groups:  # the moments resume; the settings are the config's
            group.update(adamw_settings(self.config.train))
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]
