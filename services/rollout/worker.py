"""The rollout worker: a plain class (the controller wraps it with `ray.remote`) that
holds the pipeline with the current LoRA version and turns prompts into rollout batches."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from common import wire
from common.config import Config
from common.denoising import PromptEmbeds, encode_prompts, sigma_schedule
from common.lora import LoraWeights, attach_lora, load_lora, lora_state_dict
from common.models import Precision, load_pipeline, resolve_device
from services.rollout.sampler import initial_noise, sample_ode, sample_sde


class StaleWeightsError(RuntimeError):
    """The worker holds an older LoRA than the call asks for (it was restarted)."""


class RolloutWorker:
    def __init__(self, config: Config, name: str = "rollout-0"):
        self.config = config
        self.name = name
        if config.run.num_torch_threads:
            torch.set_num_threads(config.run.num_torch_threads)
        self.device = resolve_device(config.model.device)
        self.pipe = load_pipeline(config.model.path, Precision.resolve(config.model.precision, self.device), self.device)
        attach_lora(self.pipe.transformer, config.lora)
        self.version = 0
        s = config.sample
        self.negative = encode_prompts(self.pipe, [s.negative_prompt], config.model.max_sequence_length)
        self._embeds: OrderedDict[str, PromptEmbeds] = OrderedDict()  # prompt -> embeddings, most recent last
        self.train_schedule = sigma_schedule(self.pipe.scheduler, s.train_steps, self.device)
        self.eval_schedule = sigma_schedule(self.pipe.scheduler, s.eval_steps, self.device)
        self._busy_seconds = 0.0
        self._running = False  # a generate call is executing
        self._last_progress = time.monotonic()
        self._steps = 0
        self._calls: OrderedDict[int, tuple[float, float]] = OrderedDict()  # seed -> (start, seconds), recent calls

    def ready(self) -> str:
        return self.name

    def policy_version(self) -> int:
        """The LoRA version this worker samples with (0 after a restart, until it is sent one)."""
        return self.version

    def progress(self) -> dict:
        """Answered while `generate` runs (the actor's "progress" concurrency group, see
        services/controller/cluster.py): whether a call is running, the seconds since it
        last made progress (a denoising step; 0 when none runs: a finished call whose
        result waits to be collected is not running), the step count, the cumulative busy
        seconds, and (start wall time, seconds) of the recent calls by seed, so the
        controller can time an iteration's rollouts apart from anything else."""
        return {"running": self._running, "steps": self._steps, "busy_seconds": self._busy_seconds,
                "stalled_for": time.monotonic() - self._last_progress if self._running else 0.0,
                "calls": dict(self._calls)}

    def _step_done(self) -> None:
        self._steps += 1
        self._last_progress = time.monotonic()

    def lora_names(self) -> list[str]:
        """The LoRA's weight names in the order of its parameters (the order in which the
        learner's EMA keeps its shadows)."""
        return list(lora_state_dict(self.pipe.transformer))

    def embed(self, prompts: Sequence[str]) -> PromptEmbeds:
        """The prompts' text embeddings, from a cache of the `rollout.prompt_cache_size`
        most recently used prompts (evaluation prompts recur every evaluation, training
        prompts every epoch); the rest encoded in one batch."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeds))
        if missing:
            encoded = encode_prompts(self.pipe, missing, self.config.model.max_sequence_length)
            for i, prompt in enumerate(missing):
                self._embeds[prompt] = encoded.select([i])
        for prompt in prompts:
            self._embeds.move_to_end(prompt)
        out = PromptEmbeds.cat([self._embeds[p] for p in prompts])
        while len(self._embeds) > max(self.config.rollout.prompt_cache_size, len(prompts)):
            self._embeds.popitem(last=False)
        return out

    def set_weights(self, weights: LoraWeights) -> int:
        """Load a LoRA version published by the learner (digest and binding checked)."""
        load_lora(self.pipe.transformer, weights)
        self.version = weights.version
        return self.version

    def generate(self, prompts: Sequence[str], prompt_index: Sequence[int], metadata: Sequence[Mapping[str, Any]],
                 seed: int, min_version: int = 0, sde_window: tuple[int, int] | None = None) -> pa.RecordBatch:
        """`sample.group_size` SDE samples of each prompt, as one Arrow rollout batch.

        Prompt embeddings are computed once per prompt, then repeated for its group.
        Every image starts from its own noise, or, with `sample.same_latent`, every
        image of a group from its group's noise (the SDE steps' noise still differs).
        `sde_window` [start, end): only those steps are SDE steps (sample.sde_window_size).
        Refuses to sample with a LoRA older than `min_version` (a restarted worker starts
        from version 0 until the controller sends it the current one)."""
        if self.version < min_version:
            raise StaleWeightsError(f"{self.name} holds LoRA version {self.version}, the call needs {min_version}")
        start, wall_start = time.perf_counter(), time.time()
        self._step_done()
        self._running = True
        try:
            return self._generate(prompts, prompt_index, metadata, seed, sde_window)
        finally:
            self._running = False
            seconds = time.perf_counter() - start
            self._busy_seconds += seconds
            self._calls[seed] = (wall_start, seconds)
            while len(self._calls) > 256:
                self._calls.popitem(last=False)

    def _generate(self, prompts, prompt_index, metadata, seed: int, sde_window) -> pa.RecordBatch:
        s = self.config.sample
        g = s.group_size
        embeds = self.embed(prompts)
        rows = torch.arange(len(prompts)).repeat_interleave(g)
        generator = torch.Generator(self.device).manual_seed(seed)
        timesteps, sigmas = self.train_schedule
        if s.same_latent:
            noise = initial_noise(self.pipe, len(prompts), s.resolution, generator).repeat_interleave(g, dim=0)
        else:
            noise = initial_noise(self.pipe, len(rows), s.resolution, generator)
        latents, log_probs, images = [], [], []
        for chunk, x in zip(rows.split(s.batch_size), noise.split(s.batch_size)):
            out = sample_sde(self.pipe, embeds.select(chunk), self.negative.expand(len(chunk)), timesteps, sigmas, x,
                             guidance_scale=s.guidance_scale, noise_level=s.noise_level, generator=generator,
                             window=sde_window, on_step=self._step_done)
            latents.append(out.latents.cpu().numpy())
            log_probs.append(out.log_probs.cpu().numpy())
            images.append(out.images)
        rows_np = rows.numpy()
        batch = wire.make_rollout_batch(
            prompts=[prompts[i] for i in rows_np], prompt_index=np.asarray(prompt_index)[rows_np],
            metadata=[metadata[i] for i in rows_np], images=np.concatenate(images),
            latents=np.concatenate(latents), timesteps=np.tile(timesteps.cpu().numpy(), (len(rows_np), 1)),
            log_probs=np.concatenate(log_probs), forward_batch=np.arange(len(rows_np)) // s.batch_size,
            policy_version=self.version, rollout_worker=self.name,
            prompt_embeds=self._embeds_column(embeds, g),
        )
        return batch

    def _embeds_column(self, embeds: PromptEmbeds, group_size: int) -> list[bytes | None]:
        """The `prompt_embeds` column: each prompt's embeddings on its group's first row,
        and the negative prompt's on the call's first row, under the negative key."""
        column: list[bytes | None] = [None] * (len(embeds) * group_size)
        for i in range(len(embeds)):
            column[i * group_size] = embeds.select([i]).to_bytes(self.negative if i == 0 else None)
        return column

    def evaluate(self, prompts: Sequence[str], prompt_index: Sequence[int], metadata: Sequence[Mapping[str, Any]],
                 seeds: Sequence[Sequence[int]]) -> pa.RecordBatch:
        """ODE samples with `sample.eval_steps` steps: `len(seeds[i])` images of prompt i,
        image k starting from the noise of seed `seeds[i][k]` alone (whatever else the
        call holds), as one batch of the scorers' columns (wire.make_image_batch)."""
        start = time.perf_counter()
        s = self.config.sample
        embeds = self.embed(prompts)
        rows = torch.arange(len(prompts)).repeat_interleave(torch.tensor([len(k) for k in seeds]))
        flat_seeds = [seed for per_prompt in seeds for seed in per_prompt]
        noise = torch.cat([initial_noise(self.pipe, 1, s.resolution, torch.Generator(self.device).manual_seed(seed))
                           for seed in flat_seeds])
        timesteps, sigmas = self.eval_schedule
        images = [sample_ode(self.pipe, embeds.select(chunk), self.negative.expand(len(chunk)), timesteps, sigmas, x,
                             guidance_scale=s.guidance_scale)
                  for chunk, x in zip(rows.split(s.batch_size), noise.split(s.batch_size))]
        rows_np = rows.numpy()
        batch = wire.make_image_batch([prompts[i] for i in rows_np], np.asarray(prompt_index)[rows_np],
                                      [metadata[i] for i in rows_np], np.concatenate(images), flat_seeds, self.version)
        self._busy_seconds += time.perf_counter() - start
        return batch
