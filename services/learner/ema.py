"""Exponential moving average of the LoRA weights, for evaluation and checkpoints."""
from __future__ import annotations

import contextlib

import torch


class LoraEma:
    """ema <- decay * ema + (1 - decay) * w, applied every `every` optimizer steps
    (the paper's settings: decay 0.9, every 8 steps). Shadows live in float32 on the
    parameters' device."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int):
        self.params = params
        self.decay = decay
        self.every = every
        self.steps = 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Swap the EMA weights into the model for the duration of the block."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
