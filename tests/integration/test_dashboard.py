"""The controller's gauges reach Ray's Prometheus endpoint with the right tags and values."""
import re
import time
import urllib.request

import pytest

from services.controller.dashboard import DashboardMetrics

pytestmark = pytest.mark.ray

_SAMPLE = re.compile(r"^ray_(flowgrpo_\w+)\{(.*)\} (\S+)$")


@pytest.fixture(scope="module")
def metrics_port(ray_cluster):
    """The session's Ray cluster, whose metrics agent serves Prometheus text on this port."""
    return ray_cluster["metrics_port"]


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """{(metric, value of its flowgrpo tag or ""): value} from the metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if m := _SAMPLE.match(line):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = next((tags[k] for k in ("phase", "worker", "reward", "queue", "metric") if k in tags), "")
            samples[(m.group(1), key)] = float(m.group(3))
    return samples


def _wait_for(port: int, expected: dict, seconds: float = 20.0) -> dict:
    """The scraped samples once they hold `expected` (key -> value, None: absent), or the
    last scrape when `seconds` ran out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            samples = _scrape(port)
        except OSError:  # the metrics agent may still be starting
            samples = {}
        if all(samples.get(key) == value for key, value in expected.items()) or time.monotonic() > deadline:
            return {key: samples.get(key) for key in expected}
        time.sleep(0.25)


def test_gauges_are_exported_with_their_tags_and_kept_alive(metrics_port):
    dashboard = DashboardMetrics(refresh_s=0.5)
    dashboard.set_phase("rollout")
    dashboard.set_phase("learn")
    dashboard.set_iteration(7)
    dashboard.set_worker_version("rollout-0", 6)
    dashboard.set_worker_version("rollout-1", 5)
    dashboard.set_images_per_second(12.5)
    dashboard.set_reward_means({"ocr": 0.75, "total": 0.5})
    dashboard.set_queue_depth("reward", 3)
    dashboard.set_eval({"geneval/overall": 0.63, "ocr/accuracy": 0.59})
    expected = {
        ("flowgrpo_phase", "rollout"): 0.0, ("flowgrpo_phase", "learn"): 1.0,
        ("flowgrpo_iteration", ""): 7.0,
        ("flowgrpo_policy_version", "rollout-0"): 6.0, ("flowgrpo_policy_version", "rollout-1"): 5.0,
        ("flowgrpo_images_per_second", ""): 12.5,
        ("flowgrpo_reward_mean", "ocr"): 0.75, ("flowgrpo_reward_mean", "total"): 0.5,
        ("flowgrpo_queue_depth", "reward"): 3.0,
        ("flowgrpo_eval", "geneval/overall"): 0.63, ("flowgrpo_eval", "ocr/accuracy"): 0.59,
    }
    assert _wait_for(metrics_port, expected) == expected

    # Ray's agent drops a series not set again within 2 report intervals (2 s here): the
    # refresh thread keeps every series alive while nothing is set, and once it is closed
    # they age out.
    time.sleep(3.5)
    assert _wait_for(metrics_port, expected, seconds=5) == expected
    dashboard.close()
    gone = {key: None for key in expected}
    assert _wait_for(metrics_port, gone, seconds=10) == gone
