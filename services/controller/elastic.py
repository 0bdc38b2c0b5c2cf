"""Elastic rollout workers: `flowgrpo scale RUN_DIR --rollout-workers N` changes how many
rollout workers a running job has, also one submitted with Ray Jobs.

The job starts a small named actor (`ScaleControl`, named after the run folder, in the
`flowgrpo` namespace) that holds the wanted number of workers; `flowgrpo scale` connects
to the same cluster and sets it. Between iterations the trainer calls `Elastic.step`,
which never blocks on resources:
- more workers wanted: each new worker asks for its own placement group; once that is
  placed the actor starts, and once it is up it is sent the current LoRA and joins the
  next iteration's dispatch. A group the cluster cannot place yet (a node is gone, the
  autoscaler has not brought one) stays pending and is checked again next iteration,
  while the run goes on with the workers it has.
- fewer: pending requests are dropped first, then the newest workers stop taking new
  calls; each is stopped once every call already sent to it has been collected (its
  chunks finish; a call lost with it is sampled again on another worker).
- a node dies: once Ray marks it dead (its raylet missed `health_check_failure_threshold`
  health checks `health_check_period_ms` apart, 5 x 3 s by default), the rollout workers
  placed there are dropped from the set taking calls and killed with their placement
  groups (Ray would otherwise keep rescheduling them); their calls fail and are sampled
  again on the others. The wanted count is unchanged, so each gets a replacement through
  the pending groups above, placed when the cluster (its autoscaler) has room again. With
  no worker left nothing can sample: the run waits for a replacement, rollout.timeout_s
  at most.
Logged per iteration: `rollout_workers` (taking calls), `rollout_workers_pending`
(requested, not yet joined), `workers_lost` (to dead nodes) and `scale_events` (workers
requested, joined, removed or lost), and the dashboard's `flowgrpo_rollout_workers` gauge.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import NamedTuple

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from services.controller import cluster

NAMESPACE = "flowgrpo"


class ScaleError(RuntimeError):
    """`flowgrpo scale` found no running job of the run folder."""


def control_name(run_dir: str | Path) -> str:
    """The control actor's name: the same for every spelling of one run folder."""
    return "scale-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class ScaleControl:
    """The wanted number of rollout workers of one run."""

    def __init__(self, target: int):
        self.target = target

    def set(self, target: int) -> int:
        self.target = target
        return target

    def get(self) -> int:
        return self.target


def request(run_dir: str | Path, workers: int) -> None:
    """Ask the job training in `run_dir` for `workers` rollout workers (the caller is
    connected to the job's cluster)."""
    try:
        control = ray.get_actor(control_name(run_dir), namespace=NAMESPACE)
    except ValueError:
        raise ScaleError(f"RUN_DIR {run_dir}: no job is training in this run folder on this Ray cluster "
                         f"(start it with `flowgrpo train`, or give the cluster's --address)") from None
    ray.get(control.set.remote(workers))


class Pending(NamedTuple):
    """A rollout worker's placement group waiting for room, and its `ready()` reference,
    taken once when the group is requested: each `group.ready()` call asks the GCS anew,
    and a fresh one polled with timeout 0 is never answered in time (measured on an idle
    local cluster: 41 polls over 20 s, none ready, where one reference kept from the
    request was ready 0.5 s later), so a placed group waited minutes to be seen."""
    group: object
    index: int
    ready: ray.ObjectRef


class Elastic:
    def __init__(self, trainer, worker_cls):
        self.trainer, self.worker_cls = trainer, worker_cls
        # on the driver's node: a lost node never takes the wanted count with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.control = ray.remote(num_cpus=0)(ScaleControl).options(  # one left by a run stopped a moment ago: reused
            name=control_name(trainer.run_dir), namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy=here).remote(len(trainer.rollouts))
        ray.get(self.control.set.remote(len(trainer.rollouts)))
        self.next_index = len(trainer.rollouts)
        self.placing: list[Pending] = []  # placement groups not yet placed
        self.starting: list[tuple[cluster.RolloutHandle, ray.ObjectRef]] = []  # (worker, its ready() call)
        self._told_pending = False
        self.events = 0  # since the last step: workers requested, joined, removed or lost
        self.lost = 0  # since the last step: workers lost with their node

    @property
    def wanted(self) -> int:
        return ray.get(self.control.get.remote())

    def step(self) -> dict[str, float]:
        """Between iterations: act on lost nodes and the wanted number of workers, without
        blocking while any worker is left."""
        t = self.trainer
        self._act()
        self._wait_while_none()
        metrics = {"rollout_workers": float(len(t.rollouts)), "scale_events": float(self.events),
                   "workers_lost": float(self.lost),
                   "rollout_workers_pending": float(len(self.placing) + len(self.starting))}
        self.events = self.lost = 0
        t.dashboard.set_rollout_workers(len(t.rollouts))
        return metrics

    def drop_lost(self) -> None:
        """Drop and kill the rollout workers whose node Ray reports dead (the trainer calls
        this when a call fails); with none left, wait for a replacement."""
        self._drop_lost()
        self._wait_while_none()

    def _act(self) -> None:
        """One pass: drop the workers of dead nodes, request or remove workers, start the
        placed ones, let the started ones join, stop the retired ones."""
        self._drop_lost()
        t, target = self.trainer, self.wanted
        have = len(t.rollouts) + len(self.placing) + len(self.starting)
        for _ in range(target - have):
            group = cluster.rollout_group(t.config)
            self.placing.append(Pending(group, self.next_index, group.ready()))
            self.next_index += 1
            self.events += 1
        for _ in range(have - target):
            if self.placing:
                remove_placement_group(self.placing.pop().group)
            elif self.starting:
                cluster.stop([self.starting.pop()[0]])
            elif len(t.rollouts) > 1:
                t.retiring.append(t.rollouts.pop())
                tqdm.write(f"flowgrpo: {t.retiring[-1].name} takes no new calls and stops once its calls are "
                           f"collected ({len(t.rollouts)} rollout worker(s) left)", file=sys.stderr)
            self.events += 1
        self._place()
        self._join()
        self._retire()

    def _drop_lost(self) -> None:
        """Drop and kill the rollout workers whose node Ray reports dead (one `ray.nodes()`
        call). Their calls in flight fail and the trainer samples them again elsewhere."""
        t = self.trainer
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        lost = {h.name: h for h in t.rollouts + [h for h, _ in self.starting] + t.retiring
                if not nodes.get(h.node, {}).get("Alive", False)}
        if not lost:
            return
        retired = {h.name for h in t.retiring}
        t.rollouts = [h for h in t.rollouts if h.name not in lost]
        self.starting = [(h, ref) for h, ref in self.starting if h.name not in lost]
        t.retiring = [h for h in t.retiring if h.name not in lost]
        cluster.stop(list(lost.values()))
        self.events += len(lost)
        self.lost += len(lost)
        for name, handle in lost.items():
            where = nodes.get(handle.node, {}).get("NodeManagerAddress", "?")
            after = "it was retiring" if name in retired else "a replacement is requested"
            tqdm.write(f"flowgrpo: {name} is lost with its node {where} ({handle.node[:12]}); "
                       f"{len(t.rollouts)} rollout worker(s) left, {after}", file=sys.stderr)
        t.dashboard.set_rollout_workers(len(t.rollouts))

    def _wait_while_none(self) -> None:
        """With every rollout worker lost nothing can sample: wait for a replacement to
        join, at most rollout.timeout_s."""
        if self.trainer.rollouts:
            return
        from services.controller.trainer import RunFailed  # not at the top: the trainer imports this module

        timeout = self.trainer.config.rollout.timeout_s
        tqdm.write(f"flowgrpo: no rollout worker left; the run waits up to {timeout:g} s (rollout.timeout_s) "
                   f"for the cluster to place one", file=sys.stderr)
        deadline = time.monotonic() + timeout
        while not self.trainer.rollouts:
            if time.monotonic() > deadline:
                raise RunFailed(f"every rollout worker was lost and none was placed within rollout.timeout_s="
                                f"{timeout:g} s; add nodes to the cluster")
            time.sleep(1.0)
            self._act()

    def _place(self) -> None:
        placed = [p for p in self.placing if ray.wait([p.ready], timeout=0)[0]]
        for pending in placed:
            self.placing.remove(pending)
            handle = cluster.start_rollout_worker(self.worker_cls, self.trainer.config, pending.index,
                                                  own_group=pending.group)
            self.starting.append((handle, handle.actor.ready.remote()))
        if self.placing and not self._told_pending:
            tqdm.write(f"flowgrpo: {len(self.placing)} rollout worker(s) wait for the cluster to place them; "
                       f"the run goes on with {len(self.trainer.rollouts)}", file=sys.stderr)
        self._told_pending = bool(self.placing)

    def _join(self) -> None:
        """Workers that are up load the current LoRA (queued before any call) and join."""
        joined = [(h, ref) for h, ref in self.starting if ray.wait([ref], timeout=0)[0]]
        for handle, ref in joined:
            self.starting.remove((handle, ref))
            handle.actor.set_weights.remote(self.trainer._weights_ref)
            self.trainer.rollouts.append(handle)
            tqdm.write(f"flowgrpo: {handle.name} joined ({len(self.trainer.rollouts)} rollout worker(s))",
                       file=sys.stderr)
        self.events += len(joined)

    def _retire(self) -> None:
        """Stop the retiring workers that no call in flight still needs."""
        busy = self.trainer.workers_in_flight()
        done = [h for h in self.trainer.retiring if h.name not in busy]
        for handle in done:
            self.trainer.retiring.remove(handle)
        cluster.stop(done)

    def stop(self) -> None:
        for pending in self.placing:
            remove_placement_group(pending.group)
        cluster.stop([h for h, _ in self.starting] + self.trainer.retiring)
        self.placing, self.starting, self.trainer.retiring = [], [], []
        ray.kill(self.control, no_restart=True)
