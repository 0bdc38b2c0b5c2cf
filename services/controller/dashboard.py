"""Live training metrics on the Ray dashboard (Prometheus, through ray.util.metrics).

The controller sets these gauges as the run goes; Ray's metrics agent exports them on each
node's metrics port, where Prometheus scrapes them for Grafana (Ray adds its `ray_` prefix,
so `flowgrpo_iteration` is scraped as `ray_flowgrpo_iteration`):

    flowgrpo_phase{phase}             1 for the phase the controller is in, 0 for the others seen so far
    flowgrpo_iteration                the current training iteration
    flowgrpo_policy_version{worker}   the LoRA version each rollout worker has loaded
    flowgrpo_images_per_second        rollout throughput of the last iteration
    flowgrpo_reward_mean{reward}      mean reward per reward name (and the weighted total)
    flowgrpo_queue_depth{queue}       items waiting in each queue
    flowgrpo_eval{metric}             the last evaluation's metrics (geneval/overall, ocr/accuracy, ...)

The phase is a 0/1 gauge per phase name rather than a numeric id: a Grafana state-timeline
panel on `flowgrpo_phase == 1` shows the phase by name, and a new phase needs no id table.

Ray 2.60 exports a gauge value once after each `set` and its agent forgets a series not
set again within two report intervals (2 x RAY_metrics_report_interval_ms, 20 s by default;
at least 2 s). A training iteration takes minutes, so a background thread sets every last
value again each `refresh_s` seconds, until `close()`. Gauges report only from a connected
Ray driver or worker (`ray.init()` first).
"""
from __future__ import annotations

import threading
from typing import Mapping

from ray.util.metrics import Gauge


_GAUGES = {  # key: (metric name, description, tag key)
    "phase": ("flowgrpo_phase", "1 for the controller's current phase, 0 for the others", "phase"),
    "iteration": ("flowgrpo_iteration", "Current training iteration", None),
    "worker_version": ("flowgrpo_policy_version", "LoRA policy version loaded by each rollout worker", "worker"),
    "images_per_second": ("flowgrpo_images_per_second", "Rollout images generated per second", None),
    "reward_mean": ("flowgrpo_reward_mean", "Mean reward of the last iteration per reward name", "reward"),
    "queue_depth": ("flowgrpo_queue_depth", "Items waiting in each queue", "queue"),
    "rollout_workers": ("flowgrpo_rollout_workers", "Rollout workers taking calls (flowgrpo scale changes it; "
                        "a lost node or worker lowers it until its replacement joins)", None),
    "eval": ("flowgrpo_eval", "The last evaluation's metrics (GenEval accuracies, OCR accuracy, PickScore)", "metric"),
}


class DashboardMetrics:
    """The controller's gauges; each setter records the new value at once, and a daemon
    thread keeps the last values exported until `close()`."""

    def __init__(self, refresh_s: float = 1.0):
        self._gauges = {key: (Gauge(name, description, tag_keys=(tag,) if tag else None), tag)
                        for key, (name, description, tag) in _GAUGES.items()}
        self._values: dict[tuple[str, str | None], float] = {}  # (gauge, tag value or None) -> last value
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, args=(refresh_s,), daemon=True,
                                        name="flowgrpo-dashboard-refresh")
        self._thread.start()

    def set_phase(self, name: str) -> None:
        """Mark `name` as the current phase (1) and every phase seen before as not (0)."""
        with self._lock:
            phases = {tag for gauge, tag in self._values if gauge == "phase"} | {name}
        for phase in phases:
            self._set("phase", 1.0 if phase == name else 0.0, phase)

    def set_iteration(self, iteration: int) -> None:
        self._set("iteration", iteration)

    def set_worker_version(self, worker: str, version: int) -> None:
        self._set("worker_version", version, worker)

    def set_images_per_second(self, value: float) -> None:
        self._set("images_per_second", value)

    def set_reward_means(self, means: Mapping[str, float]) -> None:
        for name, value in means.items():
            self._set("reward_mean", value, name)

    def set_rollout_workers(self, count: int) -> None:
        self._set("rollout_workers", count)

    def set_queue_depth(self, name: str, depth: int) -> None:
        self._set("queue_depth", depth, name)

    def set_eval(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._set("eval", value, name)

    def close(self) -> None:
        """Stop the refresh thread; the series then age out of the dashboard."""
        self._stop.set()
        self._thread.join()

    def _set(self, gauge: str, value: float, tag: str | None = None) -> None:
        with self._lock:
            self._values[(gauge, tag)] = float(value)
            self._export(gauge, float(value), tag)

    def _export(self, gauge: str, value: float, tag: str | None) -> None:
        metric, tag_key = self._gauges[gauge]
        metric.set(value, tags=None if tag is None else {tag_key: tag})

    def _refresh_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                for (gauge, tag), value in self._values.items():
                    self._export(gauge, value, tag)
