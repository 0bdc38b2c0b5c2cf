"""Async mode: the sync loop with rollouts one policy version ahead.

While the learner updates on iteration k, the rollout workers already sample iteration
k + 1 with the LoRA they hold; the new version is queued behind those calls. Samples are
thus at most one version stale (`run.max_staleness` >= 1), and the PPO ratio uses the
behaviour log-probs that came with each sample, as DESIGN.md §2 asks. The learner's
time is hidden behind rollouts instead of adding to them.
"""
from __future__ import annotations

import time

from services.controller.trainer import InFlight, SyncTrainer


class AsyncTrainer(SyncTrainer):
    _ahead: InFlight | None = None

    def iteration(self, it: int) -> dict[str, float]:
        start = time.perf_counter()
        self.dashboard.set_iteration(it)
        scored = self.gather(self._ahead or self.launch(it))
        data, metrics = scored.data, scored.metrics
        self._ahead = self.launch(it + 1) if it + 1 < self.config.run.iterations else None
        metrics.update(self.learn(scored))
        metrics.update(self.publish_weights(wait=False))
        metrics.update(self.maybe_evaluate(it))
        self._log(it, data, metrics, start)
        return metrics

    def stream_state_at(self, iteration: int) -> dict:
        """The next iteration's prompts are already drawn: a resumed run draws them again."""
        if self._ahead is not None and self._ahead.iteration == iteration:
            return self._ahead.stream_state
        return super().stream_state_at(iteration)
