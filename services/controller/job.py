"""The Ray job: connect to a cluster (or start one), run the trainer the config asks
for, and stop what was started, whether the run ends, fails or is interrupted."""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import ray

from common.config import Config
from services.controller import cluster
from services.controller.async_trainer import AsyncTrainer
from services.controller.trainer import SyncTrainer

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def train(config: Config, run_dir: str | Path, resume: bool = False, address: str | None = None) -> list[dict]:
    """Train to `run.iterations`; returns the metrics of the iterations this call ran.
    A resumed run records its config and what changed (`RunFolder.record_resume`). A run
    folder this call created is removed again when the run stops before logging its
    first iteration: nothing is left that could be mistaken for a run."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    trainer = (AsyncTrainer if config.run.mode == "async" else SyncTrainer)(config, run_dir, resume)
    plain_ray_logs()
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
