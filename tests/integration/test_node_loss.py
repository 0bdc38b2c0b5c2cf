"""A node lost while a run goes: the run goes on with the rollout workers it has, says
so, and asks for a replacement, which waits (a pending placement group) until the
cluster has room again. Real nodes of the session's Ray cluster, started from this
process on loopback and killed by their processes' ids."""
import contextlib
import dataclasses
import os
import signal
import time

import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from ray._private.node import Node
from ray._private.parameter import RayParams

from common.config import ConfigError
from services.controller import cluster
from services.controller.trainer import RunFailed, SyncTrainer
from tests.helpers.run_records import logged_once

pytestmark = pytest.mark.ray

SLOT = "flowgrpo_test_rollout_slot"  # only the nodes started here have it: rollout workers land there


@pytest.fixture
def nodes(ray_cluster):
    """A factory of worker nodes with one SLOT and no CPU (so nothing but a rollout worker
    lands there); each is removed at the end with every process it started. Started the
    way ray.cluster_utils adds a node (that class wants its own head), since `ray start`
    refuses to join a cluster kept on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""
    started = []

    def add() -> Node:
        params = RayParams(gcs_address=ray.get_runtime_context().gcs_address, node_ip_address="127.0.0.1",
                           num_cpus=0, num_gpus=0, resources={SLOT: 1}, object_store_memory=100 * 1024 ** 2,
                           min_worker_port=0, max_worker_port=0, node_manager_port=0, include_log_monitor=False)
        params.dashboard_agent_listen_port = None  # not the head's
        node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
        started.append(node)
        while not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            time.sleep(0.1)
        return node

    yield add
    for node in started:
        psutil.wait_procs(kill_node(node), timeout=10)


def node_processes(node: Node) -> list[psutil.Process]:
    """The node's raylet and everything it started (its workers and agents)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet] + raylet.children(recursive=True)


def kill_node(node: Node) -> list[psutil.Process]:
    """SIGKILL every process of the node, by its id (the machine is gone); returns them."""
    try:
        processes = node_processes(node)
    except psutil.NoSuchProcess:
        return []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended with its parent meanwhile
            process.send_signal(signal.SIGKILL)
    return processes


class LosesANode(SyncTrainer):
    """Kills the node of rollout-0 with iteration 2's call in it."""
    nodes: dict  # node id -> Node

    def launch(self, it, min_version=None):
        if it != 2:
            return super().launch(it, min_version)
        lost = self.rollouts[0]
        pid = ray.get(lost.actor.__ray_call__.remote(lambda worker: os.getpid()))
        os.kill(pid, signal.SIGSTOP)  # so that its call cannot finish before the node dies
        flight = super().launch(it, min_version)
        time.sleep(0.3)  # the call reaches the stopped process
        kill_node(self.nodes[lost.node])
        self.killed_at = time.perf_counter()
        return flight

    def iteration(self, it):
        metrics = super().iteration(it)
        if it == 2:
            self.next_done = time.perf_counter()
        return metrics


def test_a_lost_node_costs_its_worker_and_the_replacement_waits_for_room(run_config, nodes, tmp_path, capfd):
    first, second = nodes(), nodes()
    config = run_config("rollout.num_workers=2", "rollout.num_cpus=0", f"rollout.resources={{{SLOT}: 1}}",
                        "run.iterations=5", "run.checkpoint_every=0", "run.sample_images_every=0")
    with pytest.raises(ConfigError, match=f"rollout.resources.{SLOT}: rollout.num_workers x 1 = 3 {SLOT} but the "
                                          f"cluster has 2"):
        cluster.check_resources(dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, num_workers=3)))
    trainer = LosesANode(config, tmp_path / "run")
    trainer.nodes = {first.node_id: first, second.node_id: second}
    trainer.start()
    try:
        placed = sorted(h.node for h in trainer.rollouts)
        listening = {c.laddr.ip for node in (first, second) for process in node_processes(node)
                     for c in process.net_connections() if c.status == psutil.CONN_LISTEN}
        history = trainer.train()
        left = [h.name for h in trainer.rollouts]
        pending = [ray.util.placement_group_table(p.group)["state"] for p in trainer.elastic.placing]
        # The last worker's node dies too: nothing can sample, so the run waits for a
        # replacement, rollout.timeout_s at most, and then ends with a plain message.
        kill_node(trainer.nodes[trainer.rollouts[0].node])
        trainer.config = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, timeout_s=1.0))
        deadline = time.monotonic() + 30
        with pytest.raises(RunFailed, match="every rollout worker was lost and none was placed within "
                                            "rollout.timeout_s=1 s"):
            while time.monotonic() < deadline:
                trainer.elastic.step()
                time.sleep(0.2)
    finally:
        trainer.stop()
    with capfd.disabled():
        print(f"\nnode killed -> iteration 2 completed: {trainer.next_done - trainer.killed_at:.1f} s")
    assert placed == sorted(trainer.nodes)  # one worker on each node
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}  # the added nodes stay on loopback
    assert logged_once(tmp_path / "run", 5)  # the lost call was sampled again, nothing twice
    assert history[2]["chunks_resampled"] == 1
    # noticed in iteration 2 (its failed call, or the LoRA load), logged with the next one
    assert [h["workers_lost"] for h in history] == [0, 0, 0, 1, 0]
    assert [h["scale_events"] for h in history] == [0, 0, 0, 2, 0]  # lost, replacement requested
    assert [h["rollout_workers"] for h in history] == [2, 2, 2, 1, 1] and left == ["rollout-1"]
    assert [h["rollout_workers_pending"] for h in history] == [0, 0, 0, 1, 1] and pending == ["PENDING"]
    log = pq.read_table(tmp_path / "run" / "rollouts")
    assert set(log.filter(pc.field("iteration") >= 3).column("rollout_worker").to_pylist()) == {"rollout-1"}
    err = capfd.readouterr().err
    assert "rollout-0 is lost with its node 127.0.0.1" in err
    assert "1 rollout worker(s) left, a replacement is requested" in err
    assert "1 rollout worker(s) wait for the cluster to place them; the run goes on with 1" in err
    assert "rollout-1 is lost with its node" in err and "no rollout worker left; the run waits up to 1 s" in err
