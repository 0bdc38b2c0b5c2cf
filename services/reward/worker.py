"""The reward worker: scores rollout chunks with every configured scorer and the
weighted total, keeps each scorer's per-image details, and drops whole groups that
could not be scored.

    total = sum over reward.weights of weight x score

In evaluation (`score(batch, evaluation=True)`) the scorers of reward.eval run too:
their scores join the `rewards` struct but not the total.

For each scorer the chunk is cut into calls of reward.batch_size images. A call that
raises or exceeds reward.timeout_s is retried reward.retries times (with a short
backoff, for a service that is restarting); a call that still fails, or a NaN score,
fails the groups (prompt_index) of its images: they leave the returned batch and come
back as GroupFailure, never as a zero that GRPO would learn from.

A timed-out in-process call cannot be killed: it is abandoned on its daemon thread
and the retry runs on a new one. (A remote call is cancelled by its gRPC deadline.)

A plain class: the controller wraps it with ray.remote; tests use it directly.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from common.config import RewardConfig
from common.wire import metadata_column, tensor_column, with_scores
from services.reward.base import ScoreOutput
from services.reward.scorers import build_scorer

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.5  # before retry k: RETRY_BACKOFF_S * 2**(k-1), at most 5 s


@dataclass(frozen=True)
class GroupFailure:
    """A group dropped from a chunk: the first scorer that failed it, and why."""
    prompt_index: int
    scorer: str
    reason: str


class ScorerCallFailed(RuntimeError):
    """A scorer call failed after all its retries."""


@dataclass
class _Stats:
    calls: int = 0
    images: int = 0
    seconds: float = 0.0
    failed_calls: int = 0
    retries: int = 0
    nan_scores: int = 0
    counts: Counter = field(default_factory=Counter)


def _call_with_timeout(fn, timeout_s: float, name: str):
    """fn() on a daemon thread; TimeoutError when it has not returned after timeout_s."""
    result: dict = {}
    done = threading.Event()

    def run():
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"reward-{name}").start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"no answer within reward.timeout_s={timeout_s} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class RewardWorker:
    def __init__(self, config: RewardConfig):
        self.config = config
        self.weights = dict(config.weights)
        self.scorers = {name: build_scorer(name, config) for name in config.all_scorers()}
        self._stats = {name: _Stats() for name in self.scorers}
        self._failed_groups = 0

    def ready(self) -> bool:
        return True

    def engines(self) -> dict[str, str]:
        return {name: scorer.engine for name, scorer in self.scorers.items()}

    def score(self, batch: pa.RecordBatch, evaluation: bool = False) -> tuple[pa.RecordBatch, list[GroupFailure]]:
        """The rows of fully scored groups with `rewards`, `reward` and `details` columns
        added (common.wire.with_scores), without the latents (the learner reads those
        from the rollout batch itself: scoring does not copy them), and one GroupFailure
        per dropped group. With `evaluation` the reward.eval scorers run as well (a
        failure of theirs drops the group as any other would), and the rows come back
        without their images too: an evaluation gathers verdicts, and its caller holds
        the images it sent by reference."""
        images = tensor_column(batch, "image")
        prompts = batch.column("prompt").to_pylist()
        metadata = metadata_column(batch)
        groups = batch.column("prompt_index").to_numpy()
        names = list(self.scorers) if evaluation else list(self.weights)
        failures: dict[int, GroupFailure] = {}
        scores, details = {}, {}
        for name in names:
            scores[name], details[name] = self._score_all(name, images, prompts, metadata, groups, failures)
        keep = ~np.isin(groups, list(failures))
        total = sum(weight * scores[name] for name, weight in self.weights.items())
        rows = batch.filter(pa.array(keep))
        dropped = ("latents", "prompt_embeds", "image") if evaluation else ("latents", "prompt_embeds")
        rows = rows.drop_columns([c for c in dropped if c in rows.schema.names])
        per_row = [{name: details[name][i] for name in names} for i in np.flatnonzero(keep)]
        scored = with_scores(rows, {n: s[keep] for n, s in scores.items()}, total[keep], per_row)
        self._failed_groups += len(failures)
        return scored, list(failures.values())

    def _score_all(self, name, images, prompts, metadata, groups, failures) -> tuple[np.ndarray, list[dict]]:
        """The scorer's score and details per image (NaN and {} where a call failed)."""
        values = np.full(len(prompts), np.nan)
        details: list[dict] = [{} for _ in prompts]
        step = self.config.batch_size
        for start in range(0, len(prompts), step):
            rows = slice(start, start + step)
            try:
                out = self._call(name, images[rows], prompts[rows], metadata[rows])
            except ScorerCallFailed as err:
                for group in np.unique(groups[rows]):
                    failures.setdefault(int(group), GroupFailure(int(group), name, str(err)))
                continue
            values[rows] = out.scores
            details[rows] = out.details
            for i in np.flatnonzero(np.isnan(out.scores)):
                self._stats[name].nan_scores += 1
                group = int(groups[start + i])
                why = out.details[i].get("error", "no reason given")
                failures.setdefault(group, GroupFailure(group, name, f"{name} gave NaN for {prompts[start + i]!r}: {why}"))
        return values, details

    def _call(self, name, images, prompts, metadata) -> ScoreOutput:
        scorer, stats = self.scorers[name], self._stats[name]
        attempts = self.config.retries + 1
        error = ""
        for attempt in range(attempts):
            if attempt:
                stats.retries += 1
                time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), 5.0))
            started = time.perf_counter()
            try:
                out = _call_with_timeout(lambda: scorer.score(images, prompts, metadata), self.config.timeout_s, name)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                logger.warning("reward %s [%s] attempt %d/%d failed: %s", name, scorer.engine, attempt + 1, attempts, error)
                continue
            elapsed = time.perf_counter() - started
            stats.calls += 1
            stats.images += len(prompts)
            stats.seconds += elapsed
            stats.counts.update(out.counts)
            logger.info("reward %s [%s]: %d images in %.3f s", name, scorer.engine, len(prompts), elapsed)
            return out
        stats.failed_calls += 1
        raise ScorerCallFailed(f"{name} [{scorer.engine}] failed {attempts} time(s); last error: {error}")

    def metrics(self) -> dict[str, float]:
        """Cumulative, per scorer: images, seconds and calls (successful), images/s and
        seconds per call, failed calls, retries, NaN scores, the scorer's own counts
        (OCR: empty), and `<name>/engine/<engine>` = 1 naming the engine;
        `failed_groups` overall. `combine_metrics` adds up several workers' metrics."""
        out = {"failed_groups": float(self._failed_groups)}
        for name, s in self._stats.items():
            out[f"{name}/images"] = float(s.images)
            out[f"{name}/seconds"] = s.seconds
            out[f"{name}/calls"] = float(s.calls)
            out[f"{name}/failed_calls"] = float(s.failed_calls)
            out[f"{name}/retries"] = float(s.retries)
            out[f"{name}/nan_scores"] = float(s.nan_scores)
            out.update({f"{name}/{key}": float(value) for key, value in s.counts.items()})
            out[f"{name}/engine/{self.scorers[name].engine}"] = 1.0
        return _with_rates(out)


_RATES = ("/images_per_s", "/seconds_per_call")  # derived from the counters, never summed


def combine_metrics(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of several reward workers as those of one: counters add up, rates are
    recomputed from the summed images, seconds and calls (an engine marker then counts
    the workers running that engine)."""
    total: Counter = Counter()
    for metrics in per_worker:
        total.update({key: value for key, value in metrics.items() if not key.endswith(_RATES)})
    return _with_rates(dict(total))


def _with_rates(metrics: dict[str, float]) -> dict[str, float]:
    """Add `<name>/images_per_s` and `<name>/seconds_per_call` from the counters."""
    for name in [key[:-len("/images")] for key in metrics if key.endswith("/images")]:
        seconds, calls = metrics[f"{name}/seconds"], metrics[f"{name}/calls"]
        metrics[f"{name}/images_per_s"] = metrics[f"{name}/images"] / seconds if seconds else 0.0
        metrics[f"{name}/seconds_per_call"] = seconds / calls if calls else 0.0
    return metrics
