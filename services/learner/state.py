"""The learner's checkpoint state without pickle: every tensor in one safetensors blob,
everything else in a JSON-able dict, so loading a checkpoint runs no code from the file.

    tensors (safetensors)                 meta (JSON)
      lora/<peft key>                       format, version (policy version)
      optimizer/<param index>/<key>         optimizer: param_groups (lr, betas, ...) and
      ema/<param index>                       any non-tensor per-parameter state
                                            ema_steps (null without EMA)
                                            generator: the torch RNG state as a list of bytes

`pack` takes and `unpack` gives the dict `Learner` keeps its state in (torch's optimizer
`state_dict` layout), so the learner's own loading code does not change with the format.
"""
from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = 1


def pack(state: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(safetensors bytes, JSON-able meta) of a learner state dict with keys version,
    lora, optimizer, ema (None or {"steps", "shadow"}) and generator."""
    tensors = {f"lora/{key}": value for key, value in state["lora"].items()}
    optimizer = state["optimizer"]
    other: dict[str, dict[str, Any]] = {}
    for index, entries in optimizer["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                other.setdefault(str(index), {})[key] = value
    ema = state["ema"]
    if ema is not None:
        tensors.update({f"ema/{i}": shadow for i, shadow in enumerate(ema["shadow"])})
    meta = {
        "format": FORMAT,
        "version": int(state["version"]),
        "optimizer": {"param_groups": optimizer["param_groups"], "state": other},
        "ema_steps": None if ema is None else int(ema["steps"]),
        "generator": state["generator"].tolist(),
    }
    blob = save_tensors({key: value.detach().cpu().contiguous() for key, value in tensors.items()})
    return blob, meta


def unpack(blob: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    """The learner state dict `pack` was given, from its two halves."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"learner checkpoint format {meta.get('format')!r} is not {FORMAT}: it was written by "
                         "another version of flowgrpo; resume it with that version")
    tensors = load_tensors(blob)
    lora, shadows, per_param = {}, {}, {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "lora":
            lora[rest] = value
        elif kind == "ema":
            shadows[int(rest)] = value
        else:
            index, _, name = rest.partition("/")
            per_param.setdefault(int(index), {})[name] = value
    for index, entries in meta["optimizer"]["state"].items():
        per_param.setdefault(int(index), {}).update(entries)
    # JSON has no tuples: betas and the like come back as the tuples torch gave
    groups = [{key: tuple(value) if isinstance(value, list) and key != "params" else value
               for key, value in group.items()} for group in meta["optimizer"]["param_groups"]]
    ema = None
    if meta["ema_steps"] is not None:
        ema = {"steps": meta["ema_steps"], "shadow": [shadows[i] for i in range(len(shadows))]}
    return {
        "version": meta["version"],
        "lora": lora,
        "optimizer": {"state": per_param, "param_groups": groups},
        "ema": ema,
        "generator": torch.tensor(meta["generator"], dtype=torch.uint8),
    }
