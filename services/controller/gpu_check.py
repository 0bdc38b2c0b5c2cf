"""`flowgrpo gpu-check`: what one device does per role, on SD3.5 Medium's real shapes,
with random weights (nothing is downloaded), through the project's own code.

- Transformer: SD3Transformer2DModel built from the published config of
  stabilityai/stable-diffusion-3.5-medium (transformer/config.json, `SD35_MEDIUM`),
  in `model.precision`; the VAE from its published config (`SD35_VAE`).
- Text conditioning: random embeddings of the real shapes stand in for the three text
  encoders: 77 CLIP tokens + `model.max_sequence_length` T5 tokens of width 4096, pooled
  2048 (77 + 256 = 333 tokens with diffusers' default length).
- Rollout: `sample.batch_size` images of `sample.resolution` px per call of
  services/rollout/sampler.sample_sde (`sample.train_steps` SDE steps, CFG
  `sample.guidance_scale` through common/denoising.guided_velocity), VAE decode included.
- Learner: one optimizer step on one micro-batch of `train.micro_batch_size` of those
  samples through the Learner's own per-step loss (Learner._step and
  Learner._accumulate: policy loss, the KL forward of the LoRA-disabled reference when
  train.beta > 0, the backward), over the trained steps (floor(timestep_fraction x T)),
  then gradient clipping and AdamW, with and without KL, with and without gradient
  checkpointing. The first step's ratio deviation max|exp(logp - logp_old) - 1| is
  taken before any update, in the configured precision.
- Weights: export_lora (safetensors bytes, sha256) of the rank-`lora.rank` LoRA, then
  load_lora into `COPIES` fresh transformers with the same adapter layout (what a
  rollout worker does on every publish).
- Peak memory per role: torch.cuda.max_memory_allocated, reset between roles; on the
  CPU the process's peak resident size so far (ru_maxrss), which cannot be reset.

`--size small` runs the same code with a tiny transformer and VAE on the CPU in
seconds (the suite does); its figures say nothing about SD3.5.
"""
from __future__ import annotations

import gc
import json
import math
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common.config import Config
from common.denoising import PromptEmbeds, sigma_schedule
from common.lora import attach_lora, export_lora, load_lora
from common.models import Precision, _autocast_forward, quiet_libraries, resolve_device
from services.learner.learner import Learner, adamw_settings
from services.rollout.sampler import initial_noise, sample_sde

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: the first 13
# blocks carry a second self-attention over the image tokens).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-medium, vae/config.json
SD35_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_TOKENS = 77
# The small size: the same classes at a few hundred thousand parameters, 32 px.
SMALL = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
    pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
)
SMALL_VAE = dict(SD35_VAE, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=1)
SMALL_SHAPES = dict(resolution=32, batch=2, text_tokens=4, clip_tokens=4)
PAPER_BETA = 0.04  # the KL figures use train.beta, or this when the config has none
COPIES = 4  # rollout workers receiving the LoRA in the broadcast figure


@dataclass(frozen=True)
class Shapes:
    """What one check runs: the transformer and VAE configs, image and batch sizes, and
    the text conditioning's token count."""
    transformer: dict
    vae: dict
    resolution: int
    batch: int         # images per rollout call (sample.batch_size)
    micro_batch: int   # samples per learner micro-batch (train.micro_batch_size)
    tokens: int        # CLIP + T5 tokens

    @staticmethod
    def of(size: str, config: Config) -> "Shapes":
        if size == "small":
            s = SMALL_SHAPES
            return Shapes(SMALL, SMALL_VAE, s["resolution"], s["batch"], s["batch"],
                          s["clip_tokens"] + s["text_tokens"])
        if size == "sd35-medium":
            return Shapes(SD35_MEDIUM, SD35_VAE, config.sample.resolution, config.sample.batch_size,
                          config.train.micro_batch_size, CLIP_TOKENS + config.model.max_sequence_length)
        raise ValueError(f"--size: unknown size {size!r}; choose sd35-medium or small")


class _LossOnly(Learner):
    """The Learner's per-step loss (`_step`, `_accumulate`) on a transformer built here:
    the learner's code without its pipeline loading and prompt encoding."""

    def __init__(self, config: Config, transformer, negative: PromptEmbeds, timesteps, sigmas):
        self.config, self.transformer, self.negative = config, transformer, negative
        self.timesteps, self.sigmas = timesteps, sigmas


def build_transformer(shapes: Shapes, precision: Precision, device: torch.device):
    """The transformer with random weights, built directly on the device (no host copy
    of 2.5 B parameters), frozen, in the configured precision."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        transformer = SD3Transformer2DModel(**shapes.transformer)
    transformer.to(precision.transformer).requires_grad_(False).eval()
    if precision.autocast is not None:
        _autocast_forward(transformer, precision.autocast)
    return transformer


def _pipe(shapes: Shapes, transformer, device: torch.device):
    """A StableDiffusion3Pipeline of the transformer, a random VAE of the published
    config and SD3's scheduler; no text encoders (random embeddings stand in)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    with torch.device(device):
        vae = AutoencoderKL(**shapes.vae).requires_grad_(False).eval()
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def _embeds(shapes: Shapes, batch: int, dtype: torch.dtype, device: torch.device, generator) -> PromptEmbeds:
    t = shapes.transformer
    tokens = torch.randn(batch, shapes.tokens, t["joint_attention_dim"], generator=generator)
    return PromptEmbeds(tokens.to(device, dtype),
                        torch.randn(batch, t["pooled_projection_dim"], generator=generator).to(device, dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_check(config: Config, size: str = "sd35-medium", repeats: int = 2, log=print) -> dict:
    """Measure every figure (module docstring) and return them as a flat dict."""
    quiet_libraries()
    device = resolve_device(config.model.device)
    precision = Precision.resolve(config.model.precision, device)
    shapes = Shapes.of(size, config)
    s, t = config.sample, config.train
    generator = torch.Generator().manual_seed(config.run.seed)
    out: dict = {"size": size, "device": str(device), "precision": config.model.precision,
                 "resolution": shapes.resolution, "rollout_batch": shapes.batch, "micro_batch": shapes.micro_batch,
                 "text_tokens": shapes.tokens, "train_steps": s.train_steps, "guidance_scale": s.guidance_scale,
                 "lora_rank": config.lora.rank}

    start = time.perf_counter()
    transformer = build_transformer(shapes, precision, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        params = attach_lora(transformer, config.lora)
    pipe = _pipe(shapes, transformer, device)
    out["transformer_parameters_m"] = sum(p.numel() for p in transformer.parameters()) / 1e6
    out["build_seconds"] = time.perf_counter() - start
    log(f"gpu-check: {size} transformer, {out['transformer_parameters_m']:.1f} M parameters, {device}, "
        f"{config.model.precision}, built in {out['build_seconds']:.1f} s")

    # Rollout: whole calls of sample_sde, the first one a warm-up.
    timesteps, sigmas = sigma_schedule(pipe.scheduler, s.train_steps, device)
    cond = _embeds(shapes, shapes.batch, precision.transformer, device, generator)  # as encode_prompts casts
    negative = _embeds(shapes, 1, precision.transformer, device, generator)
    uncond = negative.expand(shapes.batch)
    noise_gen = torch.Generator(device).manual_seed(config.run.seed)
    _reset_peak(device)
    seconds = []
    for _ in range(repeats + 1):
        x = initial_noise(pipe, shapes.batch, shapes.resolution, noise_gen)
        _sync(device)
        begin = time.perf_counter()
        rollout = sample_sde(pipe, cond, uncond, timesteps, sigmas, x, guidance_scale=s.guidance_scale,
                             noise_level=s.noise_level, generator=noise_gen)
        _sync(device)
        seconds.append(time.perf_counter() - begin)
    out["rollout_images_per_second"] = shapes.batch / (sum(seconds[1:]) / repeats)
    out["rollout_peak_gib"] = _peak_gib(device)
    log(f"gpu-check: rollout {out['rollout_images_per_second']:.3f} images/s ({s.train_steps} SDE steps, "
        f"CFG {s.guidance_scale:g}, batch {shapes.batch}, {shapes.resolution} px), "
        f"peak {out['rollout_peak_gib']:.2f} GiB")

    # Learner: one optimizer step on one micro-batch of those samples per timing.
    rows = torch.arange(shapes.micro_batch) % shapes.batch
    steps = list(range(int(t.timestep_fraction * s.train_steps)))
    latents = rollout.latents[rows, :steps[-1] + 2].to(device)
    old_log_probs = rollout.log_probs[rows][:, steps].to(device)
    advantages = torch.randn(shapes.micro_batch, generator=generator).to(device)
    learner = _LossOnly(config, transformer, negative, timesteps, sigmas)
    optimizer = torch.optim.AdamW(params, **adamw_settings(t))

    def optimizer_step(beta: float) -> dict:
        learner.config = _with_beta(config, beta)
        optimizer.zero_grad(set_to_none=True)
        metrics = learner._accumulate(latents, old_log_probs, advantages, cond.select(rows), None, steps,
                                      1 / len(steps))
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        return metrics

    beta_kl = t.beta if t.beta > 0 else PAPER_BETA
    for checkpointing in (False, True):
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        for kl in (False, True):
            key = f"learner{'_kl' if kl else ''}{'_checkpointing' if checkpointing else ''}"
            what = (f"learner {'with' if kl else 'without'} KL, {'with' if checkpointing else 'without'} gradient "
                    f"checkpointing")
            _reset_peak(device)
            seconds = []
            try:
                for _ in range(repeats + 1):
                    _sync(device)
                    begin = time.perf_counter()
                    metrics = optimizer_step(beta_kl if kl else 0.0)
                    if "first_step_ratio_dev" not in out:  # the very first step, before any update
                        out["first_step_ratio_dev"] = float(metrics["ratio_dev"])
                        log(f"gpu-check: first-step ratio deviation {out['first_step_ratio_dev']:.3g} "
                            f"({config.model.precision})")
                    _sync(device)
                    seconds.append(time.perf_counter() - begin)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                out[f"{key}_samples_per_second"], out[f"{key}_peak_gib"] = None, _peak_gib(device)
                log(f"gpu-check: {what}: out of memory (micro-batch {shapes.micro_batch}); lower "
                    "train.micro_batch_size or turn on learner.gradient_checkpointing")
                continue
            out[f"{key}_samples_per_second"] = shapes.micro_batch / (sum(seconds[1:]) / repeats)
            out[f"{key}_peak_gib"] = _peak_gib(device)
            log(f"gpu-check: {what}: {out[f'{key}_samples_per_second']:.3f} samples/s ({len(steps)} steps, "
                f"micro-batch {shapes.micro_batch}), peak {out[f'{key}_peak_gib']:.2f} GiB")
    transformer.disable_gradient_checkpointing()
    del optimizer, learner, latents, rollout
    out.update(_broadcast(config, shapes, precision, device, transformer, log))
    return out


def _with_beta(config: Config, beta: float) -> Config:
    return replace(config, train=replace(config.train, beta=beta))


def _broadcast(config: Config, shapes: Shapes, precision: Precision, device: torch.device, transformer, log) -> dict:
    """Serialize the trained LoRA once and load it into COPIES fresh transformers."""
    _reset_peak(device)
    begin = time.perf_counter()
    weights = export_lora(transformer, version=1)
    serialize = time.perf_counter() - begin
    copies = []
    for _ in range(COPIES):
        copy = build_transformer(shapes, precision, device)
        attach_lora(copy, config.lora)
        copies.append(copy)
    _sync(device)
    begin = time.perf_counter()
    for copy in copies:
        load_lora(copy, weights)
    _sync(device)
    load = time.perf_counter() - begin
    out = {"lora_megabytes": len(weights.data) / 1e6, "lora_serialize_seconds": serialize,
           "lora_load_seconds": load, "lora_copies": COPIES, "broadcast_peak_gib": _peak_gib(device)}
    log(f"gpu-check: LoRA rank {config.lora.rank} ({out['lora_megabytes']:.1f} MB): serialized in {serialize:.3f} s, "
        f"loaded into {COPIES} transformers in {load:.3f} s, peak {out['broadcast_peak_gib']:.2f} GiB")
    return out


def write_json(figures: dict, path: str | Path) -> None:
    """The figures as JSON; a learner variant that ran out of memory is null."""
    bad = [k for k, v in figures.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"gpu-check: figures {bad} are not finite")
    Path(path).write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
