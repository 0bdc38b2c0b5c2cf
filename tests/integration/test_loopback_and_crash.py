"""A local run listens on loopback only, measured on its processes' sockets (not trusted
from a setting), and a run killed mid-way leaves records that read and resume whole."""
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def listening_sockets(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every socket that accepts connections (TCP
    LISTEN) or datagrams from anyone (unconnected UDP) in `root`'s process tree."""
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            name, connections = process.name(), process.net_connections(kind="inet")
        except psutil.Error:  # exited meanwhile
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                found.add((name, c.laddr.ip, c.laddr.port))
    return found


def outside_loopback(sockets):
    def loopback(ip):
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too

    return sorted(s for s in sockets if not loopback(s[1]))


def test_the_test_cluster_listens_on_loopback_only(ray_cluster):
    @ray.remote(num_cpus=0)
    def pid():
        return os.getpid()

    worker = ray.get(pid.remote())
    sockets = listening_sockets(psutil.Process())
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any(p.pid == worker for p in psutil.Process().children(True))
    assert outside_loopback(sockets) == []


def _flowgrpo(*args, tiny_model_dir):
    """`flowgrpo train` as a user runs it: its own process, with no Ray setting of ours in
    its environment (the test session's loopback variables are removed)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    tiny = [f"model.path={tiny_model_dir}", "sample.resolution=32", "sample.train_steps=4", "sample.group_size=4",
            "sample.prompts_per_iteration=2", "sample.batch_size=8", "train.micro_batch_size=8",
            "rollout.num_workers=1", "run.num_torch_threads=1", "run.sample_images_every=0", "run.iterations=4",
            "run.checkpoint_every=1"]
    sets = [part for item in tiny for part in ("--set", item)] if args[0] == "--run-dir" else []
    return subprocess.Popen([sys.executable, "-m", "services.controller.cli", "train", *args, *sets], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _watch(process, seen, until=lambda: False, timeout=300):
    """Record the process tree's listening sockets (and its pids) until it exits or `until()`."""
    deadline = time.monotonic() + timeout
    root = psutil.Process(process.pid)
    while process.poll() is None and time.monotonic() < deadline:
        seen["sockets"] |= listening_sockets(root)
        with contextlib.suppress(psutil.Error):  # the tree may end while it is read
            seen["pids"] |= {p.pid for p in root.children(recursive=True)}
        if until():
            return True
        time.sleep(0.3)
    return False


def test_a_local_run_listens_on_loopback_and_a_killed_one_resumes_its_records_whole(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    seen = {"sockets": set(), "pids": set()}
    read_while_running = []

    def two_iterations_logged():
        if not (run_dir / "rollouts" / "iter_000001.parquet").exists():
            return False
        read_while_running.append(pq.read_table(run_dir / "rollouts").num_rows)  # no writer holds a file open
        return True

    first = _flowgrpo("--run-dir", str(run_dir), tiny_model_dir=tiny_model_dir)
    try:
        assert _watch(first, seen, until=two_iterations_logged), first.communicate()[0][-3000:]
        first.send_signal(signal.SIGKILL)  # the driver dies mid-run, between files
        first.wait()
    finally:
        first.kill()
        for pid in seen["pids"]:  # the Ray processes it started, if they outlive it
            with contextlib.suppress(psutil.Error):  # already gone
                psutil.Process(pid).kill()
    assert read_while_running and read_while_running[0] >= 8
    for path in (run_dir / "rollouts").iterdir():  # every file the crash left reads
        if not path.name.startswith("."):
            pq.read_table(path)
    crashed = pq.read_table(run_dir / "rollouts")
    assert crashed.num_rows >= 16

    second = _flowgrpo("--resume", str(run_dir), tiny_model_dir=tiny_model_dir)
    _watch(second, seen)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output[-3000:]
    log = pq.read_table(run_dir / "rollouts")
    groups = Counter(zip(log.column("iteration").to_pylist(), log.column("group").to_pylist()))
    assert sorted(groups) == [(it, group) for it in range(4) for group in (2 * it, 2 * it + 1)]
    assert set(groups.values()) == {4}  # every (iteration, group) once, with its 4 images

    names = {name for name, _, _ in seen["sockets"]}
    assert {"gcs_server", "raylet"} <= names, seen["sockets"]  # the measurement saw the cluster
    assert outside_loopback(seen["sockets"]) == []
