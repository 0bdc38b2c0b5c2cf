"""The sync training loop (the paper's schedule): rollout, score, advantages, update,
publish the new LoRA, repeat.

Per iteration the controller draws `sample.prompts_per_iteration` prompts and cuts them
into rollout calls of whole groups, spread over the rollout workers. Each finished
rollout chunk goes to a reward worker at once (scoring overlaps the remaining rollouts);
the controller computes group advantages, the learner updates, and the new LoRA is put
into the object store once and loaded by every rollout worker, which checks digest,
version and binding. A lost chunk (rollout worker died, call timed out) is re-sampled on
another worker; a chunk whose reward worker died is scored again from its batch in the
object store; a group whose scoring failed is dropped and counted, never zero-filled.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import remove_placement_group
from tqdm import tqdm

from common import wire
from common.config import Config
from common.lora import save_diffusers_lora
from common.prompts import PromptStream, load_prompts, resolve_prompt_path
from common.sde import sde_window
from services.controller import cluster, evaluation
from services.controller.dashboard import DashboardMetrics
from services.controller.elastic import Elastic
from services.controller.iteration import assign_advantages, reward_stats
from services.controller.learner_group import LearnerGroup
from services.controller.run_folder import RunFolder
from services.learner.learner import Learner
from services.reward.scorers import scorer_needs
from services.reward.worker import RewardWorker, combine_metrics
from services.rollout.worker import RolloutWorker, StaleWeightsError

CHUNK_RETRIES = 3
CONTROLLER_STATE = "controller.json"
LEARNER_TENSORS, LEARNER_META = "learner.safetensors", "learner.json"  # no pickle: learner/state.py


class RunFailed(RuntimeError):
    """A known failure that ends the run: the message names the cause (the command
    line adds how to continue)."""


@dataclass
class InFlight:
    """An iteration's rollout calls on their way."""
    iteration: int
    pending: dict
    started: float
    stream_state: dict  # before this iteration drew its prompts


@dataclass
class Scored:
    """An iteration's scored rows with advantages, the rollout batches they came from
    (object refs, in the rows' order) and the iteration's metrics so far."""
    data: pa.Table
    rollouts: list
    calls: np.ndarray  # per row of data: the index of its rollout batch in `rollouts`
    metrics: dict


@dataclass
class Chunk:
    """One rollout call: whole groups of consecutive draws, with its own seed."""
    index: int
    draws: list
    seed: int
    min_version: int
    window: tuple[int, int] | None = None  # the iteration's SDE window (sample.sde_window_size)
    attempts: int = 0
    rescored: int = 0  # times its batch was scored again after a reward worker died
    worker: cluster.RolloutHandle | None = None
    started: float = field(default=0.0)


class SyncTrainer:
    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.folder: RunFolder | None = None  # created once the cluster is known to hold the config
        records = load_prompts(resolve_prompt_path(config.prompts.train), config.prompts.format)
        self.stream = PromptStream(records, config.run.seed)
        self.eval_records = evaluation.eval_records(config)
        self.start_iteration = 0
        self.resume = resume
        self.rollouts: list[cluster.RolloutHandle] = []  # the workers taking calls
        self.retiring: list[cluster.RolloutHandle] = []  # removed, stopped once their calls are collected
        self.elastic: Elastic | None = None
        self.rewards: list = []
        self.learner = None
        self._next_reward = 0
        self._probes: dict[str, tuple[ray.ObjectRef, float]] = {}  # worker -> its progress() call, when sent
        self._busy_mark: tuple[float, dict] | None = None  # (when, each worker's busy seconds) at the last gather
        self._learn_end: float | None = None
        self._learner_restarts = 0
        self.version = 0

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        cluster.check_resources(self.config)
        if self.resume and not (self.run_dir / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume {self.run_dir}: no checkpoints/ folder there")
        self.folder = RunFolder(self.run_dir)
        print(f"flowgrpo: starting {self.config.rollout.num_workers} rollout worker(s), "
              f"{self.config.reward.num_workers} reward worker(s) and the learner", file=sys.stderr)
        self.dashboard = DashboardMetrics()
        self.dashboard.set_phase("starting")
        shared = cluster.colocated_group(self.config) if self.config.placement == "colocated" else None
        self._colocated = shared
        self.learner = LearnerGroup(Learner, self.config, group=shared)
        needs = [scorer_needs(name, self.config.reward) for name in self.config.reward.all_scorers()]
        self.rewards = [cluster.start_reward_worker(RewardWorker, self.config, needs)
                        for _ in range(self.config.reward.num_workers)]
        self.rollouts = [cluster.start_rollout_worker(RolloutWorker, self.config, i, shared_group=shared)
                         for i in range(self.config.rollout.num_workers)]
        ray.get([w.ready.remote() for w in self.rewards] + [h.actor.ready.remote() for h in self.rollouts])
        self.learner.ready()
        engines = ray.get(self.rewards[0].engines.remote())
        print("flowgrpo: reward " + " + ".join(f"{weight:g} x {name} [{engines[name]}]"
                                               for name, weight in self.config.reward.weights.items()), file=sys.stderr)
        if self.resume:
            self._restore()
        else:
            self.folder.write_config(self.config)
        self.publish_weights(wait=True)
        self.elastic = Elastic(self, RolloutWorker)

    def stop(self) -> None:
        """Kill every actor this trainer started and free their placement groups."""
        if self.elastic is not None:
            self.elastic.stop()
            self.elastic = None
        if self.rollouts:
            cluster.stop(self.rollouts)
            self.rollouts = []
        if self.learner is not None:
            self.learner.stop()
        for actor in self.rewards:
            ray.kill(actor, no_restart=True)
        if getattr(self, "_colocated", None) is not None:
            remove_placement_group(self._colocated)
            self._colocated = None
        self.rewards = []
        self.learner = None
        if self.folder is not None:
            self.folder.close()
        if hasattr(self, "dashboard"):
            self.dashboard.close()

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        """Run to `run.iterations`; returns the logged metrics of this process's iterations."""
        history = []
        cfg = self.config.run
        bar = tqdm(initial=self.start_iteration, total=cfg.iterations, desc="flowgrpo", unit="it", dynamic_ncols=True)
        self._initial_stream = self.stream.state() if self.start_iteration == 0 else None
        if self.start_iteration == 0:
            self.maybe_evaluate(0)  # the row before any update
        it = self.start_iteration
        while it < cfg.iterations:
            try:
                metrics = self.iteration(it)
                done = it + 1
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                    self.checkpoint(done)
            except (RayActorError, RayTaskError) as err:  # the learner's death, or someone else's error
                first = self.start_iteration
                it = self.recover_learner(err, it)
                del history[max(0, it - first):]  # redone
                bar.reset(total=cfg.iterations)
                bar.update(it)
                continue
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", step=f"{metrics['time/iteration']:.1f}s")
            it += 1
        self.save_final_lora()
        return history

    def recover_learner(self, err: Exception, it: int) -> int:
        """After `err` at iteration `it`: when a learner rank is dead, restart the learner
        group from the last checkpoint (or from the start, before the first) and return
        the iteration to go on from; the iterations after the checkpoint are redone and
        their records replaced. Any other error is raised again."""
        if self.learner.alive():
            raise err
        self._learner_restarts += 1
        if self._learner_restarts > CHUNK_RETRIES:
            raise RunFailed(f"the learner died {self._learner_restarts} times ({type(err).__name__}); "
                            f"see its log") from err
        directory = self.folder.latest_checkpoint()
        tqdm.write(f"flowgrpo: the learner died at iteration {it} ({type(err).__name__}); restarting it from "
                   f"{directory.name if directory else 'the start'}, the iterations since are redone", file=sys.stderr)
        self.learner.restart()
        self.reset_in_flight()
        if directory is not None:
            self._restore()
        elif self._initial_stream is not None:
            self.stream.restore(self._initial_stream)
            self.start_iteration = 0
            self.folder.truncate_after(-1)
        else:
            raise RunFailed("the learner died and its checkpoint is gone") from err
        self.publish_weights(wait=True)
        return self.start_iteration

    def reset_in_flight(self) -> None:
        """Forget the rollouts launched ahead (async), after the learner went back to a checkpoint."""

    wait_for_weights = True  # sync: the next rollouts start only once every worker holds the new LoRA

    def iteration(self, it: int) -> dict[str, float]:
        start = time.perf_counter()
        self.dashboard.set_iteration(it)
        scale = self.elastic.step()  # workers added or removed join or leave here, between iterations
        scored = self.rollouts_of(it)
        data, metrics = scored.data, {**scored.metrics, **scale}
        metrics.update(self.learn(scored))
        metrics.update(self.publish_weights(wait=self.wait_for_weights))
        metrics.update(self.maybe_evaluate(it + 1))
        self._log(it, data, metrics, start)
        return metrics

    def rollouts_of(self, it: int) -> Scored:
        """The scored rollouts of iteration `it`, sampled with the current LoRA."""
        return self.gather(self.launch(it))

    def launch(self, it: int, min_version: int | None = None) -> InFlight:
        """Dispatch the iteration's rollout chunks round-robin over the workers; a worker
        refuses a chunk while it holds a LoRA older than `min_version` (default: the
        version published last)."""
        flight = InFlight(it, {}, time.perf_counter(), self.stream.state())
        for chunk in self._plan_chunks(it, self.version if min_version is None else min_version):
            self._dispatch(chunk, self.rollouts[chunk.index % len(self.rollouts)], flight.pending)
        return flight

    def gather(self, flight: InFlight) -> Scored:
        """Wait for the chunks in flight, sending each to a reward worker as it arrives."""
        self.dashboard.set_phase("rollout")
        pending, scoring = flight.pending, {}
        scored, failures, lost, rescored, refused = [], [], 0, 0, 0
        seeds = [chunk.seed for chunk in pending.values()]
        self._probes.clear()  # answers from before (e.g. sent before an async update) are out of date
        rollout_done = time.perf_counter()  # when the last rollout call was seen finished
        while pending or scoring:
            self.dashboard.set_queue_depth("rollout", len(pending))
            self.dashboard.set_queue_depth("reward", len(scoring))
            ready, _ = ray.wait(list(pending) + list(scoring), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in pending:
                    # The batch goes to a reward worker by reference: it never passes through
                    # the driver. If the rollout failed, the scoring call fails with its error.
                    chunk = pending.pop(ref)
                    scoring[self._score(ref)] = (chunk, ref)
                    if not pending:
                        rollout_done = time.perf_counter()
                else:
                    chunk, rollout_ref = scoring.pop(ref)
                    try:
                        batch, failed = ray.get(ref)
                    except (RayActorError, RayTaskError) as err:  # a worker died, or stale weights
                        if _reward_worker_died(err):  # the rollout batch is intact: score it again
                            rescored += self._rescore(chunk, rollout_ref, err, scoring)
                        elif _refused_as_stale(err):  # refused before sampling: nothing was produced
                            refused += len(chunk.draws) * self.config.sample.group_size
                            self._retry(chunk, err, pending)
                        else:
                            lost += self._retry(chunk, err, pending)
                        continue
                    scored.append((chunk.index, batch, rollout_ref))
                    failures.extend(failed)
            lost += self._expire(pending)
        # Chunk order, not arrival order: the learner's batch is then the same in every run.
        scored = [(batch, ref) for _, batch, ref in sorted(scored, key=lambda item: item[0]) if batch.num_rows]
        if failures:
            tqdm.write(f"flowgrpo: iteration {flight.iteration}: {len(failures)} group(s) dropped, their scoring "
                       f"failed; first: {failures[0].scorer}: {failures[0].reason}", file=sys.stderr)
        if not scored:
            raise RunFailed(f"iteration {flight.iteration}: every group was lost or failed scoring "
                               f"({len(failures)} scoring failures, e.g. {failures[:1]}); see the worker logs")
        end = time.perf_counter()
        data = wire.concat([batch for batch, _ in scored])
        metrics = {**self._rollout_timings(seeds, data.num_rows), "time/reward_tail": end - rollout_done,
                   "groups_failed_scoring": float(len(failures)), "chunks_resampled": float(lost),
                   "chunks_rescored": float(rescored), "samples_refused_stale": float(refused),
                   "images": float(data.num_rows)}
        self.dashboard.set_images_per_second(metrics["images_per_second"])
        data, adv_stats = assign_advantages(data, self.config.train)
        metrics.update(adv_stats, **reward_stats(data), **self.scorer_metrics())
        calls = np.repeat(np.arange(len(scored)), [batch.num_rows for batch, _ in scored])
        return Scored(data, [ref for _, ref in scored], calls, metrics)

    def scorer_metrics(self) -> dict[str, float]:
        """The reward workers' cumulative scorer metrics under `scorer/` (images/s, seconds
        per call, failed calls, retries, NaN scores, the engine); a worker that is
        restarting is left out this time."""
        per_worker = []
        for ref in [w.metrics.remote() for w in self.rewards]:
            try:
                per_worker.append(ray.get(ref, timeout=self.config.reward.timeout_s))
            except (RayActorError, GetTimeoutError):
                continue
        return {f"scorer/{key}": value for key, value in combine_metrics(per_worker).items()}

    def learn(self, scored: Scored) -> dict[str, float]:
        """The update. The learner reads the latents straight from the rollout batches
        (by reference: they never pass through the driver) and the advantages and
        behaviour log-probs from the scored table, which goes without its images."""
        self.dashboard.set_phase("learn")
        start = time.perf_counter()
        data = scored.data
        metrics = self.learner.train(data.drop_columns(["image"]), scored.rollouts, scored.calls)
        idle = {} if self._learn_end is None else {"time/learner_idle": start - self._learn_end}
        self._learn_end = time.perf_counter()
        return {**metrics, **self.staleness_metrics(data), **idle, "time/learn": self._learn_end - start}

    def staleness_metrics(self, data: pa.Table) -> dict[str, float]:
        """Staleness u - v of each sample (u the learner's version at the update, v the
        policy version that sampled it): `staleness` the largest, `staleness/<d>` the
        number of samples d versions old. More than `run.max_staleness` is a bug of the
        admission control (AsyncTrainer), not something to train on."""
        ages = self.version - np.asarray(data.column("policy_version").to_pylist())
        limit = self.config.run.max_staleness if self.config.run.mode == "async" else 0
        if ages.max() > limit:
            raise RuntimeError(f"samples {int(ages.max())} versions old reached the update; the limit is {limit}")
        values, counts = np.unique(ages, return_counts=True)
        return {"staleness": float(ages.max()), **{f"staleness/{v}": float(c) for v, c in zip(values, counts)}}

    def maybe_evaluate(self, done: int) -> dict[str, float]:
        """After `done` iterations, when evaluation.is_due: the paper's evaluation
        (services/controller/evaluation.py) of the EMA weights, written to the run
        folder; the rollout workers get the training LoRA back afterwards."""
        if not evaluation.is_due(done, self.config.run):
            return {}
        self.dashboard.set_phase("evaluate")
        start = time.perf_counter()
        evaluation.evaluate(self.config, self.eval_records, [h.actor for h in self.rollouts], self.rewards,
                            self.learner.weights(ema=True), self.folder, done, self.dashboard)
        ray.get([h.actor.set_weights.remote(self._weights_ref) for h in self.rollouts])
        return {"time/evaluate": time.perf_counter() - start}

    # ------------------------------------------------------------------ chunks and faults

    def _plan_chunks(self, it: int, min_version: int) -> list[Chunk]:
        """Whole groups per call, about `sample.batch_size` images each (at least one group)."""
        s = self.config.sample
        draws = self.stream.next_batch(s.prompts_per_iteration)
        per_call = max(1, s.batch_size // s.group_size)
        seed_base = (self.config.run.seed * 1_000_003 + it) * 1_000
        window = sde_window(s.sde_window_size, s.sde_window_range, seed_base)  # one per iteration
        return [Chunk(k, draws[i:i + per_call], seed_base + i, min_version, window=window)
                for k, i in enumerate(range(0, len(draws), per_call))]

    def _dispatch(self, chunk: Chunk, worker: cluster.RolloutHandle, pending: dict) -> None:
        chunk.worker, chunk.started = worker, time.perf_counter()
        prompts = [r.prompt for _, r in chunk.draws]
        ref = worker.actor.generate.remote(
            prompts, [i for i, _ in chunk.draws], [r.metadata for _, r in chunk.draws], chunk.seed,
            min_version=chunk.min_version, sde_window=chunk.window)
        pending[ref] = chunk

    def _score(self, rollout_ref: ray.ObjectRef) -> ray.ObjectRef:
        """Score a rollout batch, by reference, on the next reward worker in turn."""
        reward_worker = self.rewards[self._next_reward % len(self.rewards)]
        self._next_reward += 1
        return reward_worker.score.remote(rollout_ref)

    def _rescore(self, chunk: Chunk, rollout_ref: ray.ObjectRef, err: Exception, scoring: dict) -> int:
        """A reward worker died while scoring the chunk: its rollout batch is still in the
        object store, so it is scored again on the next reward worker (Ray restarts the
        dead one, max_restarts=-1; calls wait for it), not re-sampled."""
        chunk.rescored += 1
        if chunk.rescored > CHUNK_RETRIES:
            raise RunFailed(f"the reward worker died {chunk.rescored} times scoring one rollout chunk; "
                               f"last error: {err}; see the reward worker's log") from err
        tqdm.write(f"flowgrpo: a reward worker died while scoring; the rollout chunk is scored again "
                   f"({type(err).__name__})", file=sys.stderr)
        scoring[self._score(rollout_ref)] = (chunk, rollout_ref)
        return 1

    def _retry(self, chunk: Chunk, err: Exception, pending: dict) -> int:
        """Re-sample a lost chunk on the next worker; the failed one is restarted by Ray
        and gets the current weights before its next call, or, when its node died, is
        dropped (Elastic.drop_lost). When the failed worker is the only one, the chunk
        waits until Ray has it back (else every retry would fail at once on a worker
        still restarting)."""
        chunk.attempts += 1
        if chunk.attempts > CHUNK_RETRIES:
            raise RunFailed(f"a rollout chunk failed {chunk.attempts} times; last error: {err}") from err
        self.elastic.drop_lost()
        failed = chunk.worker
        loaded = failed.actor.set_weights.remote(self._weights_ref)
        after = self.rollouts.index(failed) + 1 if failed in self.rollouts else 0  # a removed worker is not in the list
        target = self.rollouts[after % len(self.rollouts)]
        if target is failed and self._await_load(failed, loaded, cluster.START_TIMEOUT_S) is None:  # lost with its node
            return self._retry(chunk, err, pending)
        self._dispatch(chunk, target, pending)
        return 1

    def _expire(self, pending: dict) -> int:
        """Kill a hung rollout worker: one whose running call has made no progress (no
        denoising step) for `rollout.timeout_s`, by its own clock, or that has not
        answered a progress call for that long. Its calls then fail and are re-sampled
        elsewhere (_retry); Ray restarts it. Only a call that runs counts: time queued
        behind other calls, or a finished call whose result the controller has not yet
        collected (async: while the learner updates), is not running. Cancelling is no
        use, since Ray only flags a running actor task."""
        now, timeout, killed = time.perf_counter(), self.config.rollout.timeout_s, 0
        for handle in {chunk.worker.name: chunk.worker for chunk in pending.values()}.values():
            worker = handle.name
            if worker not in self._probes:
                self._probes[worker] = (cluster.progress(handle), now)
                continue
            ref, sent = self._probes[worker]
            if ray.wait([ref], timeout=0)[0]:
                del self._probes[worker]
                try:
                    report = ray.get(ref)
                except RayActorError:  # dead or restarting: its calls fail and are re-sampled
                    continue
                hung = report["running"] and report["stalled_for"] > timeout
                why = f"made no progress for {report['stalled_for']:.1f} s"
            else:
                hung, why = now - sent > timeout, f"has not answered a progress call for {now - sent:.1f} s"
            if hung:
                self._probes.pop(worker, None)
                tqdm.write(f"flowgrpo: {handle.name} {why} (rollout.timeout_s={timeout:g}): restarting it; "
                           f"its calls are sampled again", file=sys.stderr)
                ray.kill(handle.actor, no_restart=False)
                killed += 1
        return killed

    def _worker_progress(self) -> dict[str, dict | None]:
        """Each rollout worker's progress report (RolloutWorker.progress) by name; None
        for one that is restarting or does not answer within rollout.timeout_s."""
        refs = {h.name: cluster.progress(h) for h in self.rollouts + self.retiring}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=self.config.rollout.timeout_s)
            except (RayActorError, GetTimeoutError):
                out[name] = None
        return out

    def workers_in_flight(self) -> set[str]:
        """The workers with calls sent and not yet collected, between iterations (sync: none)."""
        return set()

    def _rollout_timings(self, seeds: list[int], rows: int) -> dict[str, float]:
        """Timings that mean the same in sync and async: from each worker's own record of
        the iteration's calls (by seed), `time/rollout` is the longest span one worker
        took from the start of its first call to the end of its last, and
        `time/rollout_compute` the most seconds one worker sampled; neither includes
        time a finished call waited to be collected while the learner updated.
        `time/rollout_idle`: the workers' mean seconds not sampling since the last
        gather (in sync the learner's update is there; in async it should be small)."""
        reports, now = self._worker_progress(), time.perf_counter()
        wanted, spans, busy = set(seeds), [], []
        for report in filter(None, reports.values()):
            calls = [report["calls"][seed] for seed in wanted & set(report["calls"])]
            if calls:
                spans.append(max(t + d for t, d in calls) - min(t for t, _ in calls))
                busy.append(sum(d for _, d in calls))
        span = max(spans, default=float("nan"))
        out = {"time/rollout": span, "time/rollout_compute": max(busy, default=float("nan")),
               "images_per_second": rows / span if span > 0 else float("nan")}
        counts = {name: r["busy_seconds"] for name, r in reports.items() if r}
        if self._busy_mark is not None:
            wall, before = now - self._busy_mark[0], self._busy_mark[1]
            # a worker new since, restarting or restarted (its count starts over) is skipped
            idle = [wall - (b - before[n]) for n, b in counts.items() if n in before and b >= before[n]]
            if idle:
                out["time/rollout_idle"] = float(np.mean(idle))
        self._busy_mark = (now, counts)
        return out

    # ------------------------------------------------------------------ weights

    def publish_weights(self, wait: bool) -> dict[str, float]:
        """Put the learner's LoRA into the object store once; every rollout worker loads
        it (checking digest and binding) after the calls it already has queued. With
        `wait`, block until all report the new version."""
        self.dashboard.set_phase("weight_sync")
        start = time.perf_counter()
        self._weights_ref = self.learner.weights()
        self.version = self.learner.ready()
        loaded = [h.actor.set_weights.remote(self._weights_ref) for h in self.rollouts]
        if wait:
            for h, ref in zip(self.rollouts, loaded):
                version = self._await_load(h, ref)
                if version is not None:
                    self.dashboard.set_worker_version(h.name, version)
        return {"time/weight_sync": time.perf_counter() - start, "policy_version": float(self.version)}

    def _await_load(self, handle: cluster.RolloutHandle, ref: ray.ObjectRef, wait_s: float | None = None) -> int | None:
        """The version a worker loaded; a worker that Ray is restarting gets the weights
        again once it is back (within `wait_s`, default rollout.timeout_s); None for one
        lost with its node."""
        deadline = time.monotonic() + (wait_s or self.config.rollout.timeout_s)
        while True:
            try:
                return ray.get(ref, timeout=self.config.rollout.timeout_s)
            except RayActorError as err:
                if self.elastic is not None:
                    self.elastic.drop_lost()
                if handle not in self.rollouts:  # its node is gone: Elastic asks for a replacement
                    return None
                if not isinstance(err, ActorUnavailableError) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                ref = handle.actor.set_weights.remote(self._weights_ref)

    def save_final_lora(self) -> Path:
        weights = ray.get(self.learner.weights(ema=True))
        return save_diffusers_lora(weights, self.config.lora, self.folder.lora_dir)

    # ------------------------------------------------------------------ logging, checkpoints

    def _log(self, it: int, data: pa.Table, metrics: dict, start: float) -> None:
        wall = time.perf_counter() - start
        compute = metrics["time/rollout_compute"] + metrics["time/reward_tail"] + metrics.get("learn_seconds", 0.0)
        metrics["time/iteration"] = wall
        metrics["overhead_fraction"] = max(0.0, wall - compute) / wall
        self.dashboard.set_reward_means({k.split("/")[1]: v for k, v in metrics.items()
                                         if k.startswith("reward/") and k.endswith("/mean")})
        self.folder.log_metrics(it, metrics)
        self.folder.write_rollouts(it, data)
        self.folder.plot_rewards()
        every = self.config.run.sample_images_every
        if every and (it % every == 0 or it + 1 == self.config.run.iterations):  # the first, every N-th and the last
            head = data.slice(0, min(16, data.num_rows))
            self.folder.save_sample_grid(it, wire.tensor_column(head, "image"), head.column("prompt").to_pylist(),
                                         head.column("reward").to_pylist())

    def checkpoint(self, done: int) -> Path:
        """Everything a resumed run needs to give the same next iteration: learner state
        (LoRA, optimizer, EMA, RNG, version) and the prompt stream's position."""
        tensors, meta = self.learner.state()
        state = {"iteration": done, "stream": self.next_stream_state()}
        return self.folder.write_checkpoint(done, {LEARNER_TENSORS: tensors, LEARNER_META: json.dumps(meta),
                                                   CONTROLLER_STATE: json.dumps(state), **self.checkpoint_extras()})

    def checkpoint_extras(self) -> dict[str, bytes]:
        """More files for a checkpoint (async: the LoRA versions of the iterations in flight)."""
        return {}

    def restore_extras(self, directory: Path) -> None:
        """Read what checkpoint_extras wrote."""

    def next_stream_state(self) -> dict:
        """The prompt stream's position before the next iteration draws its prompts."""
        return self.stream.state()

    def _restore(self) -> None:
        directory = self.folder.latest_checkpoint()
        if directory is None:
            raise FileNotFoundError(f"--resume {self.folder.path}: no checkpoint in {self.folder.path / 'checkpoints'}")
        state = json.loads((directory / CONTROLLER_STATE).read_text())
        self.learner.load_state((directory / LEARNER_TENSORS).read_bytes(),
                                json.loads((directory / LEARNER_META).read_text()))
        self.stream.restore(state["stream"])
        self.restore_extras(directory)
        self.start_iteration = state["iteration"]
        self.folder.truncate_after(self.start_iteration - 1)


def _refused_as_stale(err: Exception) -> bool:
    """Whether a rollout call was refused because its worker holds an older LoRA than
    the call's min_version (StaleWeightsError, wrapped in the scoring call's error)."""
    while err is not None:
        if isinstance(err, StaleWeightsError):
            return True
        err = getattr(err, "cause", None) or err.__cause__
    return False


def _reward_worker_died(err: Exception) -> bool:
    """Whether a failed scoring call failed because its reward worker's process died.
    Ray raises the actor's own error (ActorUnavailableError, ActorDiedError) for that;
    the error of the rollout call the scoring waited on arrives wrapped in a RayTaskError
    (measured with Ray 2.60: RayTaskError(ActorUnavailableError) for a killed rollout worker)."""
    return isinstance(err, RayActorError) and not isinstance(err, RayTaskError)
