"""The Ray job: connect to a cluster (or start one), run the trainer the config asks
for, and stop what was started, whether the run ends, fails or is interrupted."""
from __future__ import annotations

import shutil
from pathlib import Path

import ray

from common.config import Config
from services.controller import cluster
from services.controller.async_trainer import AsyncTrainer
from services.controller.trainer import SyncTrainer


def train(config: Config, run_dir: str | Path, resume: bool = False, address: str | None = None) -> list[dict]:
    """Train to `run.iterations`; returns the metrics of the iterations this call ran.
    A resumed run records its config and what changed (`RunFolder.record_resume`). A run
    folder this call created is removed again when the run stops before logging its
    first iteration: nothing is left that could be mistaken for a run."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    trainer = (AsyncTrainer if config.run.mode == "async" else SyncTrainer)(config, run_dir, resume)
    owns_ray = cluster.connect(address)
    finished = False
    try:
        trainer.start()
        if resume:
            trainer.folder.record_resume(config, trainer.start_iteration)
        history = trainer.train()
        finished = True
        return history
    finally:
        trainer.stop()
        if owns_ray:
            ray.shutdown()
        if not finished and created and not (run_dir / "metrics.jsonl").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)

