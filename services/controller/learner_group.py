"""The learner group: `learner.num_workers` data-parallel learner ranks as Ray actors in
one placement group, driven like one learner.

    group = LearnerGroup(Learner, config)       # N ranks, process group joined
    metrics = group.train(data, rollout_refs, calls)
    ref = group.weights(ema=False)              # rank 0 publishes
    tensors, meta = group.state()               # rank 0 checkpoints

Each rank gets the whole scored table (no latents) and only its own rollout batches:
rollout call c goes to rank c mod N, so each rank fetches about 1/N of the latents
from the object store and none pass through the driver. Learner.train keeps the ranks
in lock step (the same micro-batches, order and optimizer steps on every rank, one
all-reduce of the LoRA gradients per step), so every rank holds the same LoRA after an
update; the group checks this each iteration by comparing the ranks' digests. With
N = 1 it is one actor and no process group: the plain path.
"""
from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.config import Config, ConfigError


class LearnerDiverged(RuntimeError):
    """The ranks of a learner group no longer hold the same LoRA."""


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Rank 0's node address and a free port there, for torch.distributed's TCP store."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class LearnerGroup:
    def __init__(self, learner_cls, config: Config, group=None, timeout_s: float = 120.0):
        """`group`: a placement group whose bundle i hosts rank i (colocated placement);
        by default the group makes its own, one bundle per rank, packed."""
        self.learner_cls, self.config, self.timeout_s = learner_cls, config, timeout_s
        self.shared_group = group
        self.actors: list = []
        self._start()

    @property
    def size(self) -> int:
        return self.config.learner.num_workers

    def _start(self) -> None:
        lr, n = self.config.learner, self.size
        if self.shared_group is not None:
            self.group = self.shared_group
        else:
            bundle = {"CPU": lr.num_cpus, **({"GPU": lr.num_gpus} if lr.num_gpus else {})}
            self.group = placement_group([bundle] * n, strategy="PACK")
            ready, _ = ray.wait([self.group.ready()], timeout=self.timeout_s)
            if not ready:
                remove_placement_group(self.group)
                raise ConfigError(f"learner.num_workers: the placement group of {n} learner rank(s) ({bundle} each) "
                                  f"was not placed within {self.timeout_s:g} s")

        def on(bundle_index: int):
            return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle_index)

        self.actors = [ray.remote(self.learner_cls).options(num_cpus=lr.num_cpus, num_gpus=lr.num_gpus,
                                                            scheduling_strategy=on(rank)).remote(self.config, rank, n)
                       for rank in range(n)]
        if n > 1:
            address, port = ray.get(_rendezvous.options(scheduling_strategy=on(0)).remote())
            self._check_identical(ray.get([a.join_group.remote(address, port) for a in self.actors]), "at start")

    def ready(self) -> int:
        """Wait until every rank is up; the policy version."""
        return ray.get([a.ready.remote() for a in self.actors])[0]

    def alive(self) -> bool:
        """Whether every rank answers (a dead rank's process group cannot go on)."""
        try:
            self.ready()
        except RayActorError:
            return False
        return True

    def train(self, data: pa.Table, rollouts: list, calls: np.ndarray) -> dict[str, float]:
        """One update on the scored rows; `rollouts` are the rollout batches' object
        refs and `calls[i]` the index of row i's batch among them."""
        n = self.size
        refs = [a.train.remote(data, *[ref if c % n == rank else None for c, ref in enumerate(rollouts)], calls=calls)
                for rank, a in enumerate(self.actors)]
        per_rank = ray.get(refs, timeout=self.config.learner.timeout_s)
        if n == 1:
            return per_rank[0]
        self._check_identical(ray.get([a.digest.remote() for a in self.actors]), "after the update")
        return combine_rank_metrics(per_rank)

    def _check_identical(self, digests: list[str], when: str) -> None:
        if len(set(digests)) > 1:
            raise LearnerDiverged(f"the {self.size} learner ranks hold different LoRA weights {when} "
                                  f"(digests {[d[:12] for d in digests]}); restart from the last checkpoint")

    def weights(self, ema: bool = False) -> ray.ObjectRef:
        return self.actors[0].weights.remote(ema=ema)

    def state(self) -> tuple[bytes, dict]:
        return ray.get(self.actors[0].state_dict.remote())

    def load_state(self, tensors: bytes, meta: dict) -> None:
        ray.get([a.load_state_dict.remote(tensors, meta) for a in self.actors])

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def restart(self) -> None:
        """Kill every rank and start them again (a process group cannot lose a member), in
        a new placement group: the old one still holds its resources."""
        self._kill()
        if self.shared_group is None:
            remove_placement_group(self.group)
        self._start()

    def stop(self) -> None:
        self._kill()
        if self.shared_group is None:
            remove_placement_group(self.group)

    def _kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One learner's metrics from N ranks': counts add up, times and ratio deviations
    take the maximum (the slowest rank bounds the step), the rest are means weighted
    by the samples each rank trained."""
    total = sum(m.get("samples_trained", 0.0) for m in per_rank)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in per_rank for k in m):
        values = [m[key] for m in per_rank if key in m]
        if key == "samples_trained":
            out[key] = float(sum(values))
        elif key in ("learn_seconds", "ratio_dev_before_update"):
            out[key] = float(max(values))
        elif total:
            out[key] = float(sum(m[key] * m.get("samples_trained", 0.0) for m in per_rank if key in m) / total)
        else:
            out[key] = float(np.mean(values))
    out["learner_ranks"] = float(len(per_rank))
    return out
