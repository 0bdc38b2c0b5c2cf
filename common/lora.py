"""LoRA on the SD3 transformer: attach, export as versioned bytes, load with checks.

The learner trains only the adapter; the frozen base with the adapter disabled is the
reference policy (no second copy of the model). Weights travel from the learner to the
rollout workers as `LoraWeights(version, safetensors bytes, sha256)`; loading checks the
digest and that every expected module receives weights, because a LoRA that binds to
nothing silently samples from the base model.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from common.config import LoraConfig


class LoraLoadError(ValueError):
    """An adapter does not fit the model it is loaded into, or its bytes are corrupt."""


@dataclass(frozen=True)
class LoraWeights:
    version: int
    data: bytes      # safetensors of the peft state dict (keys without the adapter name)
    sha256: str


def attach_lora(transformer: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Add the adapter and return its trainable parameters, in float32 (the base may be
    bf16: optimiser state and updates of a low-rank delta need the precision)."""
    try:
        transformer.add_adapter(_peft_config(config))
    except ValueError as err:  # peft: a target module that is not there, or that takes no LoRA
        raise LoraLoadError(f"lora.target_modules: {config.target_modules} does not fit "
                            f"{type(transformer).__name__}: {err}") from None
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _peft_config(config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                          init_lora_weights="gaussian" if config.init == "gaussian" else True)


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def export_lora(transformer: torch.nn.Module, version: int) -> LoraWeights:
    return pack_lora(lora_state_dict(transformer), version)


def pack_lora(state: dict[str, torch.Tensor], version: int) -> LoraWeights:
    """A peft LoRA state dict as versioned safetensors bytes with their digest."""
    state = {k: v.detach().to("cpu", copy=False).contiguous() for k, v in state.items()}
    data = save_safetensors(state, metadata={"version": str(version)})
    return LoraWeights(version, data, hashlib.sha256(data).hexdigest())


def load_lora(transformer: torch.nn.Module, weights: LoraWeights) -> None:
    """Load exported weights into a transformer that carries the same adapter layout."""
    from peft import set_peft_model_state_dict

    digest = hashlib.sha256(weights.data).hexdigest()
    if digest != weights.sha256:
        raise LoraLoadError(f"LoRA version {weights.version}: sha256 mismatch (got {digest[:12]}, "
                            f"announced {weights.sha256[:12]}): the bytes were corrupted in transit")
    incoming = load_safetensors(weights.data)
    expected = lora_state_dict(transformer)
    bound = incoming.keys() & expected.keys()
    if not bound:
        raise LoraLoadError(f"LoRA version {weights.version} binds to no module of this model "
                            f"(its keys look like {next(iter(incoming), '<none>')!r}, the model's like "
                            f"{next(iter(expected), '<none>')!r}): check lora.target_modules on both sides")
    missing, unexpected = expected.keys() - bound, incoming.keys() - bound
    if missing or unexpected:
        raise LoraLoadError(f"LoRA version {weights.version} does not fit: {len(missing)} module weights missing "
                            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected "
                            f"(e.g. {sorted(unexpected)[:2]}): check lora.target_modules and lora.rank")
    for key, value in incoming.items():
        if value.shape != expected[key].shape:
            raise LoraLoadError(f"LoRA version {weights.version}: {key} has shape {tuple(value.shape)}, "
                                f"the model expects {tuple(expected[key].shape)}: check lora.rank")
    set_peft_model_state_dict(transformer, incoming)


@contextlib.contextmanager
def adapter_disabled(transformer):
    """The reference policy: the base transformer with the LoRA switched off."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def save_diffusers_lora(weights: LoraWeights, config: LoraConfig, directory: str | Path) -> Path:
    """Write the adapter where `StableDiffusion3Pipeline.load_lora_weights(directory)` loads it;
    the LoRA config (alpha in particular, which sets the scale) travels in its metadata.
    safetensors creates its file private (0600); it gets the mode of any other new file
    (0666 less the umask), so whoever may read the run folder may read its LoRA."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    directory = Path(directory)
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=load_safetensors(weights.data),
                                               transformer_lora_adapter_metadata=_peft_config(config).to_dict())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory / LORA_WEIGHT_NAME_SAFE, 0o666 & ~umask)
    return directory
