"""The run folder: everything a training run leaves behind, in one directory.

    RUN_DIR/
      config.yaml                 the validated config (a resume with --set rewrites it)
      resumes.jsonl               one line per resume: {"time", "iteration", "changed": {key: [old, new]}}
      metrics.jsonl               one JSON object a line: {"iteration": i, ...metrics}; NaN/inf -> null
      tensorboard/                the same numbers as TensorBoard scalars (`tensorboard --logdir RUN_DIR`)
      reward_curve.png            reward mean +- std per reward name against the iteration
      samples/iter_000010.png     sample grids, the reward under each image
      rollouts/iter_000012.parquet  the rollout log, one closed file per iteration: the wire schema
                                    without latents and images, plus `iteration` and `group` (the
                                    group's key, its prompt draw `prompt_index`); read all with
                                    pyarrow.parquet.read_table(RUN_DIR / "rollouts"), pandas.read_parquet
                                    or DuckDB's read_parquet('RUN_DIR/rollouts/*.parquet')
      checkpoints/iter_000050/    one directory per complete checkpoint (learner.safetensors,
                                    learner.json, controller.json and the COMPLETE mark written last)
      lora/                       the final LoRA adapter
      eval/iter_000010.json       an evaluation (services/controller/evaluation.py): its metrics, one flat object;
      eval/iter_000010.parquet      a row per image (prompt, seed, scores, the scorers' verdicts; no image);
      eval/iter_000010.png          a grid of its first images; _tags.png GenEval's accuracy per tag
      eval.jsonl                  every evaluation's metrics, one line each: {"iteration": i, ...}

Reward metrics follow one naming rule so the plot can find them: `reward/<name>/mean` and
`reward/<name>/std` (`reward_summary` builds them). A resumed run opens the same folder and
calls `truncate_after(checkpoint iteration)`, so the metrics of iterations it repeats are not
logged twice (TensorBoard's events after that iteration are purged as well, and so are the
rollout files of later iterations). One process writes to a run folder at a time.

A crash loses at most what was being written: a Parquet file is readable only once closed
(its footer comes last) and a checkpoint only once whole, so both are written under a
hidden temporary name (".iter_...") that readers skip, and renamed when complete; a
checkpoint folder without its COMPLETE mark is ignored, and says so.

`flowgrpo train` never writes into an earlier run by accident: `check_new_run_dir` refuses
one unless told to overwrite it, and `resume_point` says where `--resume` continues.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from common.config import Config, dump_config, to_dict
from common.prompts import GENEVAL_TAGS
from common.wire import for_log

_REWARD_MEAN = re.compile(r"^reward/(.+)/mean$")
_CHECKPOINT = re.compile(r"^iter_(\d+)$")
_ROLLOUTS = re.compile(r"^iter_(\d+)\.parquet$")
COMPLETE = "COMPLETE"  # a checkpoint's completion mark, written last
CAPTION_LINES = 3  # a sample's caption is wrapped onto at most this many lines under it


class RunFolderError(ValueError):
    """A folder cannot serve as asked: an earlier run where a new one was asked for, or
    no run where --resume was given. The message names the flag and the way out."""


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` holds a run of `flowgrpo train`: a config.yaml with a `run` section."""
    config = Path(path) / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("run"), dict)


def check_new_run_dir(path: str | os.PathLike, overwrite: bool) -> bool:
    """Check that a new run may write into `path` (missing or empty, or a run to
    overwrite); returns whether an earlier run is there, which the caller deletes with
    `remove_run` once the new run is ready to start. A folder that is not empty and holds
    no run is never deleted."""
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise RunFolderError(f"--run-dir {path}: is a file; give a folder")
    if not any(path.iterdir()):
        return False
    if not is_run(path):
        raise RunFolderError(f"--run-dir {path}: the folder is not empty and holds no run; give a new or empty folder")
    if not overwrite:
        raise RunFolderError(f"--run-dir {path}: holds a run already; continue it with `flowgrpo train --resume "
                             f"{path}`, or replace it with --overwrite")
    return True


def remove_run(path: str | os.PathLike) -> None:
    """Delete an earlier run (only a folder `is_run` recognises)."""
    if not is_run(path):
        raise RunFolderError(f"{path}: holds no run; not deleting it")
    shutil.rmtree(path)


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder (one with its COMPLETE mark); a folder
    without the mark (its writer was stopped before finishing) is skipped, with a line
    on stderr saying so."""
    root = Path(path) / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name)))
    for _, directory in reversed(found):
        if (directory / COMPLETE).is_file():
            return directory
        print(f"flowgrpo: {directory} is incomplete (no {COMPLETE} mark: its writer stopped before finishing); "
              "ignored", file=sys.stderr)
    return None


def resume_point(path: str | os.PathLike) -> int:
    """The iteration a resumed run starts from: that of its latest checkpoint (the
    number of iterations done). Raises RunFolderError naming --resume when `path` is no
    run or has no checkpoint yet."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"--resume {path}: no such folder; give the folder of an earlier run")
    if not is_run(path):
        raise RunFolderError(f"--resume {path}: not a run folder (no config.yaml written by flowgrpo train); "
                             "give the folder of an earlier run")
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise RunFolderError(f"--resume {path}: the run has no checkpoint yet (see run.checkpoint_every in its "
                             f"config.yaml); start it again with --run-dir {path} --overwrite")
    return int(_CHECKPOINT.match(checkpoint.name).group(1))


def config_changes(path: str | os.PathLike, config: Config) -> dict[str, list]:
    """{dotted key: [value in the run's config.yaml, value in `config`]} for every value
    that differs."""
    old = _flatten(yaml.safe_load((Path(path) / "config.yaml").read_text()) or {})
    new = _flatten(to_dict(config))
    return {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys: {"run": {"iterations": 60}} -> {"run.iterations": 60}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def reward_summary(rewards: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """`reward/<name>/mean` and `reward/<name>/std` (population std) for each reward name."""
    summary = {}
    for name, values in rewards.items():
        values = np.asarray(values, dtype=np.float64)
        summary[f"reward/{name}/mean"] = float(values.mean())
        summary[f"reward/{name}/std"] = float(values.std())
    return summary


class RunFolder:
    """Writes the run folder described in the module docstring; opening an existing folder
    keeps what is there."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.rollouts_dir = self.path / "rollouts"
        self._tensorboard = None  # a SummaryWriter, opened with the first metrics line
        self._purge_step: int | None = None
        self._drop_torn_metrics_line()
        for tmp in self.rollouts_dir.glob(".iter_*.tmp"):  # left by a killed writer; readers never saw it
            tmp.unlink()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ config and metrics

    def write_config(self, config: Config) -> Path:
        path = self.path / "config.yaml"
        dump_config(config, path)
        return path

    def record_resume(self, config: Config, iteration: int) -> dict[str, list]:
        """A resumed run's config becomes config.yaml, and resumes.jsonl gets a line saying
        when, from which iteration and what changed ({dotted key: [old, new]}); returns
        the changes."""
        changed = config_changes(self.path, config)
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "iteration": int(iteration), "changed": changed}
        with open(self.path / "resumes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if changed:
            self.write_config(config)
        return changed

    def log_metrics(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        """Append one line to metrics.jsonl. Non-finite numbers become null (JSON has no
        NaN); numpy scalars and arrays become plain numbers and lists."""
        if "iteration" in metrics:
            raise ValueError("log_metrics: 'iteration' is a reserved key; pass it as the iteration argument")
        line = json.dumps({"iteration": int(iteration), **_jsonable(dict(metrics))}, allow_nan=False)
        with open(self.metrics_path, "a", encoding="utf-8") as f:  # closing flushes every line
            f.write(line + "\n")
        self._log_tensorboard(iteration, metrics)

    def _log_tensorboard(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tensorboard"), purge_step=self._purge_step)
        for key, value in metrics.items():
            if isinstance(value, (int, float, np.number)) and math.isfinite(value):
                self._tensorboard.add_scalar(key, float(value), iteration)
        self._tensorboard.flush()  # an iteration takes seconds to minutes: each one is visible at once

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.metrics_path}:{number}: not a JSON line ({err.msg}); "
                                 "remove or fix the line") from None
        return rows

    def truncate_after(self, iteration: int) -> None:
        """Drop the metrics and rollout files of iterations after `iteration`: a run
        resumed from the checkpoint of `iteration` logs them again."""
        self._purge_step = iteration + 1
        for path in self.rollouts_dir.glob("iter_*.parquet"):
            if (m := _ROLLOUTS.match(path.name)) and int(m.group(1)) > iteration:
                path.unlink()
        kept = [row for row in self.read_metrics() if row["iteration"] <= iteration]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def _drop_torn_metrics_line(self) -> None:
        """Every line is written whole with its newline; a last line without one was cut
        by a killed process and would glue onto the next line written."""
        if not self.metrics_path.exists():
            return
        data = self.metrics_path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.metrics_path.write_bytes(data[:data.rfind(b"\n") + 1])

    # ------------------------------------------------------------ pictures

    def plot_rewards(self) -> Path | None:
        """Redraw reward_curve.png from metrics.jsonl: one panel per reward name, the mean
        with a +-std band. Returns None (and draws nothing) before any reward is logged."""
        rows = self.read_metrics()
        names = sorted({m.group(1) for row in rows for key in row if (m := _REWARD_MEAN.match(key))})
        if not names:
            return None
        figure = Figure(figsize=(7, 2.6 * len(names)), layout="constrained")
        axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
        for ax, name in zip(axes, names):
            points = [(row["iteration"], row[f"reward/{name}/mean"], row.get(f"reward/{name}/std"))
                      for row in rows if row.get(f"reward/{name}/mean") is not None]
            x = np.array([p[0] for p in points], dtype=float)
            mean = np.array([p[1] for p in points], dtype=float)
            std = np.array([np.nan if p[2] is None else p[2] for p in points], dtype=float)
            ax.plot(x, mean, marker="." if len(x) < 50 else None, label="mean")
            ax.fill_between(x, mean - std, mean + std, alpha=0.25, label="+-std")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0].set_title("reward per iteration")
        axes[0].legend(loc="best")
        axes[-1].set_xlabel("iteration")
        path = self.path / "reward_curve.png"
        tmp = self.path / "reward_curve.tmp.png"  # replaced atomically: a viewer never sees half a file
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        return path

    def save_sample_grid(self, iteration: int, images: np.ndarray, captions: Sequence[str],
                         rewards: Sequence[float], subdir: str = "samples", label: str = "reward") -> Path:
        """samples/iter_XXXXXX.png: the images in a near-square grid, under each its reward
        and its caption, wrapped at spaces onto up to CAPTION_LINES lines."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"save_sample_grid: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        n, height, width, _ = images.shape
        if len(captions) != n or len(rewards) != n:
            raise ValueError(f"save_sample_grid: {n} images need {n} captions and rewards, "
                             f"got {len(captions)} and {len(rewards)}")
        font = _caption_font()
        line_height = font.getbbox("Ag")[3] + 3
        cell_width, cell_height = max(width, 160) + 2, height + (1 + CAPTION_LINES) * line_height + 8
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        grid = Image.new("RGB", (cols * cell_width, rows * cell_height), "white")
        draw = ImageDraw.Draw(grid)
        for i in range(n):
            x, y = (i % cols) * cell_width, (i // cols) * cell_height
            left = x + (cell_width - width) // 2
            # a frame, so that an image on a light background (the toy world's) shows where it ends
            draw.rectangle((left - 1, y, left + width, y + height + 1), outline="silver")
            grid.paste(Image.fromarray(images[i]), (left, y + 1))
            draw.text((x + 3, y + height + 4), f"{label} {float(rewards[i]):.4g}", fill="black", font=font)
            for k, line in enumerate(_wrap(draw, captions[i], font, cell_width - 6, CAPTION_LINES), start=1):
                draw.text((x + 3, y + height + 4 + k * line_height), line, fill="dimgray", font=font)
        path = self.path / subdir / f"iter_{iteration:06d}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        return path

    # ------------------------------------------------------------ evaluation

    def write_eval(self, iteration: int, metrics: Mapping[str, Any], verdicts: pa.Table, images: np.ndarray,
                   captions: Sequence[str], values: Sequence[float], label: str) -> Path:
        """An evaluation after `iteration` iterations, as the module docstring lists: the
        JSON, the verdicts' Parquet (`verdicts` without images), the grid of `images` with
        `label` and caption under each, GenEval's per-tag plot when GenEval ran, its line in
        eval.jsonl (replacing an earlier evaluation of the same iteration) and TensorBoard
        scalars eval/<key> at step `iteration`. Returns the JSON's path."""
        stem = self.path / "eval" / f"iter_{iteration:06d}"
        stem.parent.mkdir(exist_ok=True)
        record = _jsonable(dict(metrics))
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        pq.write_table(for_log(verdicts), stem.with_suffix(".parquet"))
        if len(images):
            self.save_sample_grid(iteration, images, captions, values, subdir="eval", label=label)
        self._plot_eval_tags(stem.with_name(stem.name + "_tags.png"), iteration, metrics)
        rows = [row for row in self.read_eval() if row["iteration"] != iteration] + [{"iteration": iteration, **record}]
        tmp = self.path / "eval.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: r["iteration"])),
                       encoding="utf-8")
        os.replace(tmp, self.path / "eval.jsonl")
        self._log_tensorboard(iteration, {f"eval/{key}": value for key, value in metrics.items()})
        return stem.with_suffix(".json")

    def read_eval(self) -> list[dict[str, Any]]:
        path = self.path / "eval.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []

    @staticmethod
    def _plot_eval_tags(path: Path, iteration: int, metrics: Mapping[str, Any]) -> None:
        """GenEval's accuracy per tag, overall (the tags' mean) and strict, as bars."""
        keys = [f"geneval/{tag}" for tag in GENEVAL_TAGS] + ["geneval/overall", "geneval/strict"]
        keys = [key for key in keys if key in metrics]
        if not keys:
            return
        figure = Figure(figsize=(7, 3), layout="constrained")
        ax = figure.subplots()
        bars = ax.bar([key.split("/")[1] for key in keys], [metrics[key] for key in keys],
                      color=["C0"] * (len(keys) - 2) + ["C1", "C2"])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("accuracy")
        ax.set_title(f"GenEval after {iteration} iterations ({metrics.get('images', 0):.0f} images)")
        ax.tick_params(axis="x", labelrotation=20)
        figure.savefig(path, dpi=100)

    # ------------------------------------------------------------ rollout log

    def write_rollouts(self, iteration: int, table: pa.Table | pa.RecordBatch) -> Path:
        """rollouts/iter_XXXXXX.parquet: the iteration's rows without latents and images,
        with `iteration` and `group` (= prompt_index, the group's key) columns. Written
        under a hidden name and renamed once closed, so a reader never meets a file without
        its footer; writing an iteration again replaces its file."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = for_log(table)
        table = table.append_column("iteration", pa.array(np.full(table.num_rows, iteration, dtype=np.int64)))
        table = table.append_column("group", table.column("prompt_index"))
        self.rollouts_dir.mkdir(exist_ok=True)
        path = self.rollouts_dir / f"iter_{iteration:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        _replace_durably(tmp, path)
        return path

    def close(self) -> None:
        """Finish the TensorBoard log."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    # ------------------------------------------------------------ checkpoints and LoRA

    def write_checkpoint(self, iteration: int, files: Mapping[str, bytes]) -> Path:
        """checkpoints/iter_XXXXXX/ holding `files` ({name: content}) and the COMPLETE mark:
        filled under a hidden name, synced, marked, then renamed into place, so the
        folder either is complete or is not there. An earlier checkpoint of the same
        iteration (a redone iteration) is replaced."""
        root = self.path / "checkpoints"
        final = root / f"iter_{iteration:06d}"
        tmp, old = root / f".{final.name}.tmp", root / f".{final.name}.old"
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, content in {**files, COMPLETE: json.dumps({"iteration": iteration, "files": sorted(files)})}.items():
            with open(tmp / name, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    @property
    def lora_dir(self) -> Path:
        path = self.path / "lora"
        path.mkdir(exist_ok=True)
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _caption_font() -> ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib) at 11 px: Pillow's default font at its default
    10 px hints a space to nothing, so captions read "twoapplesand a banana"."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` (a word wider than a line
    is cut); when it needs more than `max_lines` lines, the last one shown ends in "..."."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    return [_ellipsize(draw, line, font, width, force=cut and k == len(lines) - 1) for k, line in enumerate(lines)]


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, force: bool = False) -> str:
    """`text` when it fits in `width` (and not `force`), else its longest head that fits with "..." after it."""
    if not force and draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _replace_durably(tmp: Path, path: Path) -> None:
    """Sync `tmp` to disk, then rename it to `path` (atomic: a reader sees the old file or
    the whole new one)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
