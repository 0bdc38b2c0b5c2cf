"""The run folder: metrics lines, plots, sample grids, the Parquet rollout log, checkpoints."""
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.config import Config, load_config
from common.wire import concat, make_rollout_batch, with_advantages, with_scores
from services.controller.run_folder import RunFolder, reward_summary


def _rollouts(n=4, version=0, seed=0):
    rng = np.random.default_rng(seed)
    batch = make_rollout_batch(
        prompts=[f"prompt {i // 2}" for i in range(n)], prompt_index=[i // 2 for i in range(n)],
        metadata=[{"target": "x"}] * n, images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        latents=rng.standard_normal((n, 3, 4, 2, 2)).astype(np.float32),
        timesteps=np.tile([1000.0, 500.0], (n, 1)), log_probs=rng.standard_normal((n, 2)),
        policy_version=version, rollout_worker="rollout-0")
    scores = rng.random(n)
    batch = with_scores(batch, {"brightness": scores}, scores)
    return with_advantages(concat([batch]), scores - scores.mean())


def test_config_and_metrics_lines(tmp_path):
    run = RunFolder(tmp_path / "run")
    config = Config()
    config.run.iterations = 7
    run.write_config(config)
    assert load_config(tmp_path / "run" / "config.yaml").run.iterations == 7

    run.log_metrics(1, {"loss": np.float32(0.5), "kl": float("nan"), "grad": [1.0, float("inf")],
                        **reward_summary({"ocr": [0.0, 1.0]})})
    run.log_metrics(2, {"loss": 0.25})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"iteration": 1, "loss": 0.5, "kl": None, "grad": [1.0, None],
                                    "reward/ocr/mean": 0.5, "reward/ocr/std": 0.5}
    assert "NaN" not in lines[0]
    assert run.read_metrics()[1] == {"iteration": 2, "loss": 0.25}
    with pytest.raises(ValueError, match="reserved"):
        run.log_metrics(3, {"iteration": 3})


def test_resume_truncates_later_metrics_and_a_torn_line(tmp_path):
    run = RunFolder(tmp_path)
    for i in range(1, 6):
        run.log_metrics(i, {"loss": i})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # a process killed mid-write
    resumed = RunFolder(tmp_path)
    assert [row["iteration"] for row in resumed.read_metrics()] == [1, 2, 3, 4, 5]
    resumed.truncate_after(3)
    resumed.log_metrics(4, {"loss": 40})
    assert resumed.read_metrics() == [{"iteration": 1, "loss": 1}, {"iteration": 2, "loss": 2},
                                      {"iteration": 3, "loss": 3}, {"iteration": 4, "loss": 40}]


def tensorboard_scalars(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_metrics_reach_tensorboard_and_a_resume_replaces_the_repeated_steps(tmp_path):
    run = RunFolder(tmp_path)
    for i in range(1, 5):
        run.log_metrics(i, {"loss": float(i), "kl": float("nan"), "grad": [1.0]})
    run.close()
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    # Event files are read in name order, which starts with the creation second and ends with a
    # per-process counter; a resumed run is a later process, so make the second differ too.
    time.sleep(1.05)
    resumed = RunFolder(tmp_path)
    resumed.truncate_after(2)
    resumed.log_metrics(3, {"loss": 30.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_reward_plot_draws_each_reward_name(tmp_path):
    run = RunFolder(tmp_path)
    assert run.plot_rewards() is None  # nothing logged yet
    for i in range(1, 5):
        metrics = reward_summary({"ocr": [i / 10, i / 5], "pickscore": [20.0 + i]})
        if i == 2:
            metrics["reward/ocr/std"] = float("nan")  # logged as null, drawn as a gap in the band
        run.log_metrics(i, metrics)
    path = run.plot_rewards()
    assert path == tmp_path / "reward_curve.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # two stacked panels
    assert not list(tmp_path.glob("*.tmp.png"))


def test_sample_grid_has_a_cell_per_image_with_a_label(tmp_path):
    run = RunFolder(tmp_path)
    images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    images[:, :, :, 0] = 255
    path = run.save_sample_grid(10, images, ["a long caption " * 10] * 5, [0.5, 1.0, float("nan"), 0.0, -1.25])
    assert path == tmp_path / "samples" / "iter_000010.png"
    with Image.open(path) as grid:
        grid = np.asarray(grid.convert("RGB"))
    cell_width = grid.shape[1] // 3  # 5 images: 3 columns, 2 rows
    assert grid.shape[1] == 3 * cell_width and grid.shape[0] > 2 * 32
    red = (grid[..., 0] == 255) & (grid[..., 1] == 0)
    assert red[:34].sum() == 3 * 32 * 32 and red.sum() == 5 * 32 * 32  # three images in the first row
    rows, cols = np.nonzero(red[:34, :cell_width])
    frame = grid[rows.min() - 1, cols.min() - 1:cols.max() + 2]
    assert (frame == 192).all()   # a silver frame around each image
    cell_height = grid.shape[0] // 2
    label = grid[34:cell_height, :cell_width]
    assert (label < 128).any()  # text under the image
    with pytest.raises(ValueError, match="uint8"):
        run.save_sample_grid(1, images.astype(np.float32), ["c"] * 5, [0.0] * 5)
    with pytest.raises(ValueError, match="captions and rewards"):
        run.save_sample_grid(1, images, ["c"] * 4, [0.0] * 5)


def test_rollout_log_is_one_closed_file_per_iteration(tmp_path):
    run = RunFolder(tmp_path)
    run.write_rollouts(0, _rollouts(4, version=0))
    run.write_rollouts(1, _rollouts(4, version=1, seed=1).to_batches()[0])
    run.write_rollouts(1, _rollouts(4, version=1, seed=2))  # an iteration written again replaces its file
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["iter_000000.parquet", "iter_000001.parquet"]
    log = pq.read_table(tmp_path / "rollouts")  # readable while the run goes: no writer holds a file open
    assert log.num_rows == 8
    assert "latents" not in log.column_names and "image" not in log.column_names
    assert sorted(zip(log.column("iteration").to_pylist(), log.column("group").to_pylist())) == \
        [(0, 0)] * 2 + [(0, 1)] * 2 + [(1, 0)] * 2 + [(1, 1)] * 2
    assert log.column("group").to_pylist() == log.column("prompt_index").to_pylist()
    assert log.schema.field("rewards").type == pa.struct([("brightness", pa.float64())])


def test_a_file_cut_by_a_killed_writer_is_never_read(tmp_path):
    run = RunFolder(tmp_path)
    run.write_rollouts(0, _rollouts(4))
    whole = (tmp_path / "rollouts" / "iter_000000.parquet").read_bytes()
    (tmp_path / "rollouts" / ".iter_000001.parquet.tmp").write_bytes(whole[: len(whole) // 2])  # no footer
    assert pq.read_table(tmp_path / "rollouts").num_rows == 4
    assert ds.dataset(tmp_path / "rollouts").count_rows() == 4
    RunFolder(tmp_path)  # the next writer clears it away
    assert [p.name for p in (tmp_path / "rollouts").iterdir()] == ["iter_000000.parquet"]


def test_resume_removes_the_rollouts_past_its_checkpoint(tmp_path):
    run = RunFolder(tmp_path)
    for it in range(5):
        run.write_rollouts(it, _rollouts(2, version=it))
    RunFolder(tmp_path).truncate_after(2)
    assert sorted(set(pq.read_table(tmp_path / "rollouts").column("iteration").to_pylist())) == [0, 1, 2]


def test_checkpoints_are_complete_or_ignored(tmp_path, capsys, monkeypatch):
    run = RunFolder(tmp_path)
    assert run.latest_checkpoint() is None
    path = run.write_checkpoint(50, {"learner.json": "{}", "learner.safetensors": b"\x00\x01"})
    assert path == tmp_path / "checkpoints" / "iter_000050"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "learner.json", "learner.safetensors"]
    assert json.loads((path / "COMPLETE").read_text()) == {"iteration": 50, "files": ["learner.json",
                                                                                      "learner.safetensors"]}
    run.write_checkpoint(9, {"a": b"nine"})
    assert run.latest_checkpoint() == path

    # a writer killed mid-checkpoint leaves a hidden folder; the latest complete one stays in use
    calls = []

    def fsync_then_die(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the process dying between two files

    monkeypatch.setattr("os.fsync", fsync_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.write_checkpoint(100, {"a": b"1", "b": b"2"})
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "iter_000100").exists()
    assert run.latest_checkpoint() == path
    # a folder under the final name without the mark (copied in part, older code) is skipped, and said so
    (tmp_path / "checkpoints" / "iter_000200").mkdir()
    (tmp_path / "checkpoints" / "notes").mkdir()
    capsys.readouterr()
    assert run.latest_checkpoint() == path
    assert "iter_000200 is incomplete (no COMPLETE mark" in capsys.readouterr().err

    again = run.write_checkpoint(50, {"a": b"redone"})  # a redone iteration replaces its checkpoint
    assert sorted(p.name for p in again.iterdir()) == ["COMPLETE", "a"] and (again / "a").read_bytes() == b"redone"
    assert run.write_checkpoint(100, {"a": b"1"}) == run.latest_checkpoint()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert run.lora_dir == tmp_path / "lora" and run.lora_dir.is_dir()


def _ink_gaps(strip: np.ndarray) -> list[int]:
    """Widths of the blank column runs between the first and the last inked column."""
    ink = (strip.min(axis=2) < 200).any(axis=0)
    columns = np.flatnonzero(ink)
    runs, width = [], 0
    for blank in ~ink[columns[0]:columns[-1] + 1]:
        if blank:
            width += 1
        elif width:
            runs.append(width)
            width = 0
    return runs


def test_sample_grid_captions_keep_their_spaces(tmp_path):
    from services.controller.run_folder import CAPTION_LINES, _caption_font

    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    path = RunFolder(tmp_path).save_sample_grid(0, images, ["two apples and a banana"], [0.5])
    with Image.open(path) as grid:
        grid = np.asarray(grid.convert("RGB"))
    line_height = _caption_font().getbbox("Ag")[3] + 3
    assert grid.shape[0] == 32 + (1 + CAPTION_LINES) * line_height + 8
    caption = grid[32 + 4 + line_height:32 + 4 + 2 * line_height]
    # four word gaps, each wider than any gap between two letters of a word
    assert sum(gap >= 4 for gap in _ink_gaps(caption)) == 4


def test_captions_wrap_at_spaces_and_a_long_one_ends_in_an_ellipsis():
    from PIL import ImageDraw

    from services.controller.run_folder import _caption_font, _wrap

    font, draw = _caption_font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "a photo of a purple suitcase right of a green fire hydrant"
    lines = _wrap(draw, text, font, 154, 3)
    assert len(lines) >= 2 and " ".join(lines) == text
    assert all(draw.textlength(line, font=font) <= 154 for line in lines)
    long = " ".join([text] * 3)
    lines = _wrap(draw, long, font, 154, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert long.startswith(" ".join(lines).removesuffix("..."))
    assert _wrap(draw, "x" * 200, font, 154, 3)[0].endswith("...")  # a word longer than a line is cut
