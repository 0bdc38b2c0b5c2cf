"""Async mode: the sync loop with rollouts one policy version ahead.

While the learner updates on iteration k, the rollout workers already sample iteration
k + 1 with the LoRA they hold; the new version is queued behind those calls. Samples are
thus at most one version stale (`run.max_staleness` >= 1), and the learner trains them
with the decoupled objective, from the behaviour log-probs that came with each sample
(DESIGN.md §1.6, §2.4). The learner's time is hidden behind rollouts instead of adding
to them.
"""
from __future__ import annotations

from services.controller.trainer import InFlight, Scored, SyncTrainer


class AsyncTrainer(SyncTrainer):
    wait_for_weights = False  # the new LoRA is queued behind the calls already dispatched
    _ahead: InFlight | None = None

    def rollouts_of(self, it: int) -> Scored:
        """Gather iteration `it` (launched during the previous update), then launch
        iteration `it + 1` with the weights the workers hold now."""
        scored = self.gather(self._ahead or self.launch(it))
        self._ahead = self.launch(it + 1) if it + 1 < self.config.run.iterations else None
        return scored

    def next_stream_state(self) -> dict:
        """The next iteration's prompts are already drawn (it was launched ahead): a resumed
        run draws them again."""
        return self._ahead.stream_state if self._ahead is not None else super().next_stream_state()
