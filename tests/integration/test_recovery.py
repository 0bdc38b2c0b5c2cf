"""Workers that die while a run goes: the run recovers and its records hold every
(iteration, group) exactly once. The session's Ray cluster, the tiny model."""
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from services.controller.async_trainer import AsyncTrainer
from services.controller.preflight import prepare

pytestmark = pytest.mark.ray
PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "pickscore.txt"


@pytest.fixture(scope="module")
def config(tiny_config, ray_cluster):
    def make(*overrides):
        return prepare(tiny_config(
            f"prompts.train={PROMPTS}", "prompts.format=text", "rollout.num_workers=1", "rollout.num_gpus=0",
            "rollout.num_cpus=0.5", "learner.num_gpus=0", "learner.num_cpus=0.5", "reward.num_cpus=0.25",
            "sample.batch_size=4", "run.sample_images_every=0", "train.learning_rate=1e-2", *overrides))
    return make


def logged_once(run_dir, iterations):
    """Every (iteration, group) of the run in the rollout log exactly once (4 images a
    group, 2 groups an iteration), and every iteration once in metrics.jsonl."""
    log = pq.read_table(Path(run_dir) / "rollouts")
    groups = Counter(zip(log.column("iteration").to_pylist(), log.column("group").to_pylist()))
    rows = [json.loads(line)["iteration"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return (groups == {(it, g): 4 for it in range(iterations) for g in (2 * it, 2 * it + 1)}
            and rows == list(range(iterations)))


class KillsTheLearner(AsyncTrainer):
    """SIGKILLs the learner's process as its `nth` update starts."""
    nth = 4

    def learn(self, scored):
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == self.nth:
            self.killed_pid = self.learner.pids()[0]
            os.kill(self.killed_pid, signal.SIGKILL)
        return super().learn(scored)


def test_a_killed_learner_is_restarted_from_its_checkpoint(config, tmp_path, capfd):
    trainer = KillsTheLearner(config("run.mode=async", "run.iterations=5", "run.checkpoint_every=2"), tmp_path / "run")
    trainer.start()
    try:
        history = trainer.train()
        pid_after = trainer.learner.pids()[0]
    finally:
        trainer.stop()
    # killed in iteration 3's update: back to the checkpoint after iteration 2, 3 and 4 redone
    assert pid_after != trainer.killed_pid
    assert [h["policy_version"] for h in history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert logged_once(tmp_path / "run", 5)
    err = capfd.readouterr().err
    assert err.count("the learner died at iteration 3") == 1 and "from iter_000002" in err
