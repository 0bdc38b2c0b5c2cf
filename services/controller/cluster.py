"""Resourcing: connecting to Ray, checking the cluster can hold the config, and starting
the workers as actors (each rollout worker in its own one-bundle placement group).

The workers themselves are plain classes; this is the only module that turns them into
Ray actors, so everything about placement lives here.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.config import Config, ConfigError
from services.controller import loopback

# Actors import transformers at start-up; keep its import-time notes (PIL fallbacks
# without torchvision) out of every worker's log.
WORKER_RUNTIME_ENV = {"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}}
PROGRESS = "progress"  # the rollout worker's concurrency group for progress()
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
START_TIMEOUT_S = 120.0  # how long a worker may take to start (or restart): placing it and loading its model


def connect(address: str | None = None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS, as `ray job submit` sets it), with
    its own settings; reuse a Ray already initialised in this process; or start a local
    one on loopback (services/controller/loopback.py), whose token auth is turned off
    only when loopback is guaranteed. Returns True when the caller owns the connection
    and must `ray.shutdown()` it."""
    plain_ray_logs()
    if ray.is_initialized():
        return False
    if not loopback.starts_local_cluster(address):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=WORKER_RUNTIME_ENV)
        return True
    loopback.prepare()
    if loopback.guaranteed():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # reachable from this machine only
    else:
        print("flowgrpo: Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so this local "
              "cluster may listen on every interface, and Ray's token auth is left on (unless RAY_AUTH_MODE=disabled); "
              "run `flowgrpo train`, or export the variable before Python starts", file=sys.stderr)
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             runtime_env=WORKER_RUNTIME_ENV)
    return True


class _StripAnsi(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _ANSI.sub("", record.getMessage()), None
        return True


def plain_ray_logs(stream=None) -> None:
    """No colour codes from Ray when `stream` (stderr) is not a terminal, so log files
    stay plain text: Ray colours the dashboard address in its start-up line and the
    `(Worker pid=...)` prefix of worker lines unless RAY_COLOR_PREFIX=0."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logger = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _StripAnsi) for f in logger.filters):
        logger.addFilter(_StripAnsi())


def _bundle(num_cpus: float, num_gpus: float, custom: dict[str, float] | None = None) -> dict[str, float]:
    bundle = {"CPU": num_cpus}
    if num_gpus:
        bundle["GPU"] = num_gpus
    return {**bundle, **(custom or {})}


def check_resources(config: Config) -> None:
    """Fail before any actor starts when the cluster cannot place the config."""
    have = ray.cluster_resources()
    r, lr, rw = config.rollout, config.learner, config.reward
    for kind in ("CPU", "GPU"):
        key = "num_cpus" if kind == "CPU" else "num_gpus"
        parts = {
            f"rollout.num_workers x rollout.{key}": r.num_workers * getattr(r, key),
            f"learner.num_workers x learner.{key}": lr.num_workers * getattr(lr, key),
            f"reward.num_workers x reward.{key}": rw.num_workers * getattr(rw, key),
        }
        need = sum(parts.values())
        if need > have.get(kind, 0) + 1e-9:
            detail = ", ".join(f"{k} = {v:g}" for k, v in parts.items())
            raise ConfigError(f"rollout.num_workers: the config needs {need:g} {kind} ({detail}) but the cluster "
                              f"has {have.get(kind, 0):g}: lower rollout.num_workers or the per-worker "
                              f"{key}, or add nodes")
    for name, amount in r.resources.items():
        if r.num_workers * amount > have.get(name, 0) + 1e-9:
            raise ConfigError(f"rollout.resources.{name}: rollout.num_workers x {amount:g} = "
                              f"{r.num_workers * amount:g} {name} but the cluster has {have.get(name, 0):g}: "
                              f"start nodes with --resources '{{\"{name}\": N}}', or lower rollout.num_workers")


@dataclass
class RolloutHandle:
    name: str
    actor: ray.actor.ActorHandle
    group: object  # its own placement group; None when it shares the colocated one
    node: str  # the Ray node id its bundle was placed on: the worker is lost when that node dies


def rollout_group(config: Config):
    """A rollout worker's own placement group of one bundle (pending until it is placed)."""
    r = config.rollout
    return placement_group([_bundle(r.num_cpus, r.num_gpus, r.resources)], strategy="STRICT_PACK")


def start_rollout_worker(worker_cls, config: Config, index: int, timeout_s: float = START_TIMEOUT_S,
                         shared_group=None, own_group=None) -> RolloutHandle:
    """One rollout actor in its own placement group of one bundle (`own_group`, placed
    already, or made here), so workers can be added or removed one by one; with
    `shared_group` (colocated placement), in bundle `index` of that group, beside
    learner rank `index`. Restarted by Ray when its process dies; when its node dies,
    replaced by the controller (Elastic.drop_lost)."""
    r = config.rollout
    if own_group is not None:
        group, bundle = own_group, 0
    elif shared_group is None:
        group, bundle = rollout_group(config), 0
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise ConfigError(f"rollout.num_workers: the placement group of rollout worker {index} "
                              f"({_bundle(r.num_cpus, r.num_gpus, r.resources)}) was not placed within {timeout_s:g} s")
    else:
        group, bundle = shared_group, index
    name = f"rollout-{index}"
    actor = ray.remote(concurrency_groups={PROGRESS: 1})(worker_cls).options(
        num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.resources, max_restarts=-1, max_task_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle),
    ).remote(config, name)
    node = placement_group_table(group)["bundles_to_node_id"][bundle]
    return RolloutHandle(name, actor, group if shared_group is None else None, node)


def progress(handle: RolloutHandle) -> ray.ObjectRef:
    """Ask a rollout worker for its progress (RolloutWorker.progress). The call runs in
    its own concurrency group, so it answers while `generate` runs; every other method
    stays in the default group of one thread, where calls keep their submission order
    (a LoRA queued behind a rollout call is loaded after it)."""
    return handle.actor.progress.options(concurrency_group=PROGRESS).remote()


def colocated_group(config: Config, timeout_s: float = START_TIMEOUT_S):
    """Colocated placement: one bundle per GPU holding a rollout worker's and a learner
    rank's shares (rollout.num_gpus + learner.num_gpus of one GPU, their CPUs)."""
    r, lr = config.rollout, config.learner
    bundle = _bundle(r.num_cpus + lr.num_cpus, r.num_gpus + lr.num_gpus, r.resources)
    group = placement_group([bundle] * lr.num_workers, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ConfigError(f"learner.num_workers: the colocated placement group ({lr.num_workers} x {bundle}) "
                          f"was not placed within {timeout_s:g} s")
    return group


def reward_worker_options(config: Config, needs: list) -> dict:
    """Actor options of a reward worker, sized by what its scorers declare
    (`ScorerNeeds`); with `reward.isolated_env`, a runtime_env that adds the scorers'
    pip packages to the cluster's environment."""
    options = dict(num_cpus=max(n.num_cpus for n in needs), num_gpus=max(n.num_gpus for n in needs),
                   max_restarts=-1, max_task_retries=0)
    packages = sorted({p for n in needs for p in n.pip})
    if config.reward.isolated_env and packages:
        options["runtime_env"] = {"pip": packages}
    return options


def start_reward_worker(worker_cls, config: Config, needs: list) -> ray.actor.ActorHandle:
    return ray.remote(worker_cls).options(**reward_worker_options(config, needs)).remote(config.reward)


def stop(handles: list[RolloutHandle]) -> None:
    for h in handles:
        ray.kill(h.actor, no_restart=True)
        if h.group is not None:
            remove_placement_group(h.group)
