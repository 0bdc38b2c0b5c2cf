"""What the rollout workers and the learner share around the transformer: prompt
embeddings, the sigma schedule, the classifier-free-guided velocity, and the SDE step
of stored latents recomputed under the current weights.

Both sides must run exactly this code for the learner's recomputed log-probs to equal
the rollout's (ratio 1 before the first update).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.sde import SdeStep, sde_step_with_logprob


@dataclass
class PromptEmbeds:
    """SD3's joint text conditioning: token embeddings [B, L, D] (CLIP-L, CLIP-G and T5
    concatenated along the sequence) and pooled CLIP embeddings [B, P]."""
    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "PromptEmbeds":
        index = torch.as_tensor(index, device=self.tokens.device, dtype=torch.long)
        return PromptEmbeds(self.tokens[index], self.pooled[index])

    def to_bytes(self, negative: "PromptEmbeds | None" = None) -> bytes:
        """safetensors bytes of one prompt's embeddings (and of the negative prompt's),
        for the rollout batch: the learner loads no text encoder (`from_bytes`)."""
        from safetensors.torch import save

        parts = {"": self} if negative is None else {"": self, "negative_": negative}
        return save({f"{prefix}{name}": getattr(e, name).detach().cpu().contiguous()
                     for prefix, e in parts.items() for name in ("tokens", "pooled")})

    @staticmethod
    def from_bytes(data: bytes, device) -> tuple["PromptEmbeds", "PromptEmbeds | None"]:
        """The prompt's embeddings and, when stored with them, the negative prompt's."""
        from safetensors.torch import load

        t = {k: v.to(device) for k, v in load(data).items()}
        negative = PromptEmbeds(t["negative_tokens"], t["negative_pooled"]) if "negative_tokens" in t else None
        return PromptEmbeds(t["tokens"], t["pooled"]), negative

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))

    def expand(self, batch: int) -> "PromptEmbeds":
        """A single row (the negative prompt) broadcast to a batch, without a copy."""
        return PromptEmbeds(self.tokens.expand(batch, -1, -1), self.pooled.expand(batch, -1))


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int) -> PromptEmbeds:
    """Encode each prompt once with the three frozen text encoders."""
    tokens, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=pipe.transformer.device,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
    )
    return PromptEmbeds(tokens.to(pipe.transformer.dtype), pooled.to(pipe.transformer.dtype))


def sigma_schedule(scheduler, num_steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [T], sigmas [T + 1]) of the flow-matching scheduler (SD3 shift 3.0);
    sigmas run from 1 to 0. Computed once per step count, not per step."""
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler.timesteps.clone().float(), scheduler.sigmas.clone().float()


def guided_velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: PromptEmbeds,
                    uncond: PromptEmbeds, guidance_scale: float, detach_uncond: bool = False) -> torch.Tensor:
    """v = v_uncond + s (v_cond - v_uncond), the classifier-free-guided velocity.

    By default both branches run as one forward of a 2B batch [uncond; cond]: the
    rollout (under no_grad) and the learner (with gradients through both branches, as
    the paper's code) then run the very same forward, so the learner's first-step
    log-probs equal the rollout's also in low precision. With `detach_uncond`
    (train.cfg_gradient: detached) the unconditional branch runs alone under no_grad
    and only the conditional one is differentiated: a backward over B samples instead
    of 2B, cheaper, but a different gradient, and a forward whose batch differs from
    the rollout's (in low precision its kernels may round differently).
    """
    batch = latents.shape[0]
    t = timestep.to(latents.device, torch.float32).expand(batch) if timestep.ndim == 0 else timestep

    def run(x, tt, embeds):
        return transformer(hidden_states=x, timestep=tt, encoder_hidden_states=embeds.tokens,
                           pooled_projections=embeds.pooled, return_dict=False)[0]

    if guidance_scale == 1.0:
        return run(latents, t, cond)
    if detach_uncond:
        with torch.no_grad():
            v_uncond = run(latents, t, uncond)
        v_cond = run(latents, t, cond)
    else:
        both = run(torch.cat([latents, latents]), torch.cat([t, t]),
                   PromptEmbeds(torch.cat([uncond.tokens, cond.tokens]), torch.cat([uncond.pooled, cond.pooled])))
        v_uncond, v_cond = both.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def recompute_step(transformer, latents: torch.Tensor, j: int, timesteps: torch.Tensor, sigmas: torch.Tensor,
                   cond: PromptEmbeds, uncond: PromptEmbeds, guidance_scale: float, noise_level: float,
                   detach_uncond: bool = False) -> SdeStep:
    """The SDE step j of stored latents [B, T+1, ...] under `transformer` as it is now,
    with the log-prob of the stored x_{j+1}: the learner's recomputation (gradients
    flow unless the caller disables them). `uncond` holds one embedding per sample."""
    dtype = transformer.dtype
    x, x_next = latents[:, j].to(dtype), latents[:, j + 1].to(dtype)
    v = guided_velocity(transformer, x, timesteps[j], cond, uncond, guidance_scale, detach_uncond=detach_uncond)
    return sde_step_with_logprob(v, x, sigmas, j, noise_level, prev_sample=x_next)
