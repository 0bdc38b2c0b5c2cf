"""The Ray job: connect to a cluster (or start one), run the trainer the config asks
for, and stop what was started."""
from __future__ import annotations

from pathlib import Path

import ray

from common.config import Config
from services.controller import cluster
from services.controller.async_trainer import AsyncTrainer
from services.controller.trainer import SyncTrainer


def train(config: Config, run_dir: str | Path, resume: bool = False, address: str | None = None) -> list[dict]:
    """Train to `run.iterations`; returns the metrics of the iterations this call ran."""
    owns_ray = cluster.connect(address)
    trainer = (AsyncTrainer if config.run.mode == "async" else SyncTrainer)(config, run_dir, resume)
    try:
        trainer.start()
        return trainer.train()
    finally:
        trainer.stop()
        if owns_ray:
            ray.shutdown()
