"""Exponential moving average of the LoRA weights, for evaluation and checkpoints."""
from __future__ import annotations

import contextlib

import torch


class LoraEma:
    """The paper's EMA of the LoRA weights, with its warm-up. With s the paper's
    global step (optimizer steps completed, from 0), after an optimizer step, when
    (s + 1) % every == 0:

        ema <- d ema + (1 - d) w,    d = min((1 + s) / (10 + s), decay)

    (the paper's settings: decay 0.9, every 8 steps). The warm-up keeps the untrained
    initial weights from lingering: the first update (s = 7) has d = 8/17, not 0.9.
    The paper's script calls its EMA once per micro-batch with the same global step,
    so under gradient accumulation it repeats an update as many times as it has
    micro-batches; we update once per optimizer step. Shadows live in float32 on the
    parameters' device."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int):
        self.params = params
        self.decay = decay
        self.every = every
        self.steps = 0
        self.shadow = [p.detach().float().clone() for p in params]

    def current_decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self) -> None:
        """Call after each optimizer step."""
        self.steps += 1
        s = self.steps
        if (s + 1) % self.every == 0:
            weight = 1.0 - self.current_decay(s)
            for shadow, p in zip(self.shadow, self.params):
                shadow.lerp_(p.detach().float(), weight)

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
