"""Async mode with bounded staleness: rollout workers keep sampling while the learner
updates, and no sample reaches an update more than `run.max_staleness` (k) versions
after the policy that sampled it (DESIGN.md §1.6, §2.4).

Admission control decides before any work starts. The learner trains iteration i at
version i (one version per iteration), and a chunk sampled now uses at least the
version the controller has published, so iteration j may be launched once the
learner is about to train iteration j - k: right after gathering iteration i, the
controller launches every iteration up to i + k. Each worker runs its calls in order
and the new LoRA is queued behind the calls already sent, so iteration j is sampled
with version max(0, j - k) exactly and trained at version j: staleness j - max(0, j - k)
<= k. Nothing is produced and then discarded for being too old. With k = 0 nothing is
launched ahead and each iteration waits for the new weights: the sync schedule, with
the same results for a seed.

The learner trains stale samples with the decoupled objective, from the behaviour
log-probs that came with each sample. A checkpoint keeps the LoRA versions the
iterations in flight were sampled with, so a resumed run samples them with the same
weights and gives the same next iteration as an uninterrupted one.
"""
from __future__ import annotations

import json
from collections import deque

import ray

from common.config import Config
from common.lora import LoraWeights
from services.controller.trainer import InFlight, Scored, SyncTrainer

BEHAVIOUR = "behaviour.json"  # in a checkpoint: the versions of the behaviour LoRA files beside it


class AsyncTrainer(SyncTrainer):
    def __init__(self, config: Config, run_dir, resume: bool = False):
        super().__init__(config, run_dir, resume)
        self.k = config.run.max_staleness
        self.wait_for_weights = self.k == 0  # k = 0: the sync schedule
        self._ahead: deque[InFlight] = deque()  # launched iterations, oldest first
        self._published: dict[int, ray.ObjectRef] = {}  # version -> its LoRA, while an iteration may need it

    def publish_weights(self, wait: bool) -> dict[str, float]:
        metrics = super().publish_weights(wait)
        self._published[self.version] = self._weights_ref
        for version in [v for v in self._published if v < self.version - self.k]:
            del self._published[version]
        return metrics

    def rollouts_of(self, it: int) -> Scored:
        """Gather iteration `it` (launched earlier, or now), then admit the iterations up
        to `it + k` while the learner updates on `it`."""
        scored = self.gather(self._ahead.popleft() if self._ahead else self._launch_with_its_version(it))
        last = self._ahead[-1].iteration if self._ahead else it
        for j in range(last + 1, min(it + self.k, self.config.run.iterations - 1) + 1):
            self._ahead.append(self._launch_with_its_version(j))
        return scored

    def _launch_with_its_version(self, j: int) -> InFlight:
        """Launch iteration j with version max(0, j - k). That is the version published
        now, except after a resume, when the iterations that were in flight at the
        checkpoint are sampled again with the older versions it kept."""
        version = max(0, j - self.k)
        weights = self._published.get(version)
        if version == self.version or weights is None:  # None: a checkpoint without them (sync, or another k)
            return self.launch(j)
        for h in self.rollouts:
            h.actor.set_weights.remote(weights)
        flight = self.launch(j, min_version=version)
        for h in self.rollouts:
            h.actor.set_weights.remote(self._weights_ref)
        return flight

    def workers_in_flight(self) -> set[str]:
        return {chunk.worker.name for flight in self._ahead for chunk in flight.pending.values()}

    def reset_in_flight(self) -> None:
        self._ahead.clear()
        self._published.clear()

    def next_stream_state(self) -> dict:
        """The next iterations' prompts are already drawn (they were launched ahead): a
        resumed run draws them again."""
        return self._ahead[0].stream_state if self._ahead else super().next_stream_state()

    def checkpoint_extras(self) -> dict[str, bytes]:
        """The LoRA versions the iterations in flight were sampled with."""
        versions = sorted({max(0, flight.iteration - self.k) for flight in self._ahead})
        files = {f"behaviour_v{v}.safetensors": ray.get(self._published[v]).data for v in versions}
        digests = {str(v): ray.get(self._published[v]).sha256 for v in versions}
        return {**files, BEHAVIOUR: json.dumps(digests).encode()}

    def restore_extras(self, directory) -> None:
        path = directory / BEHAVIOUR
        if not path.is_file():  # written by a sync run
            return
        for version, sha256 in json.loads(path.read_text()).items():
            data = (directory / f"behaviour_v{version}.safetensors").read_bytes()
            self._published[int(version)] = ray.put(LoraWeights(int(version), data, sha256))
