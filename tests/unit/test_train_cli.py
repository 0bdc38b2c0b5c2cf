"""`flowgrpo train` and its run folder: an earlier run is never overwritten unless asked,
--resume says where it continues and what changed, a finished run is left alone, and
Ctrl-C ends with a line saying how to go on. The Ray job itself is replaced by a
recorder here (tests/integration/test_train.py runs the real one)."""
import io
import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from common.config import dump_config
from services.controller import cli, cluster, job
from services.controller.run_folder import RunFolder, RunFolderError, check_new_run_dir, resume_point

PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "pickscore.txt"


@pytest.fixture()
def config_file(tiny_config, tmp_path):
    path = tmp_path / "tiny.yaml"
    dump_config(tiny_config(f"prompts.train={PROMPTS}", "prompts.format=text", "run.iterations=2"), path)
    return path


@pytest.fixture()
def finished_run(config_file, tmp_path):
    """A run folder as `flowgrpo train` leaves it after run.iterations=2."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_file.read_text())
    checkpoint = run / "checkpoints" / "iter_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "controller.json").write_text('{"iteration": 2}')
    (checkpoint / "COMPLETE").write_text('{"iteration": 2, "files": ["controller.json"]}')  # written last
    (run / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    (run / "lora").mkdir()
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    return run


@pytest.fixture()
def jobs(monkeypatch):
    """Records each Ray job the CLI would start, instead of starting it."""
    calls = []

    def record(config, run_dir, resume=False, address=None):
        calls.append({"config": config, "run_dir": Path(run_dir), "resume": resume,
                      "run_dir_existed": Path(run_dir).exists()})
        return []

    monkeypatch.setattr(job, "train", record)
    return calls


def _raising(error: BaseException):
    """A Ray job that ends in `error` (Ctrl-C, a worker that died)."""
    def train(config, run_dir, resume=False, address=None):
        raise error

    return train


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_an_earlier_run_is_refused_and_left_as_it_was(finished_run, config_file, jobs, capsys):
    before = _snapshot(finished_run)
    assert cli.main(["train", "--config", str(config_file), "--run-dir", str(finished_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"flowgrpo: error: --run-dir {finished_run}: holds a run already; continue it with "
                   f"`flowgrpo train --resume {finished_run}`, or replace it with --overwrite")
    assert _snapshot(finished_run) == before and not jobs


def test_overwrite_deletes_the_earlier_run_and_says_so(finished_run, config_file, jobs, capsys):
    assert cli.main(["train", "--config", str(config_file), "--run-dir", str(finished_run), "--overwrite"]) == 0
    assert f"--overwrite: deleting the earlier run in {finished_run}" in capsys.readouterr().err
    assert jobs[0]["run_dir"] == finished_run and not jobs[0]["run_dir_existed"] and not jobs[0]["resume"]


def test_a_folder_that_holds_no_run_is_never_overwritten(tmp_path, config_file, jobs, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert cli.main(["train", "--config", str(config_file), "--run-dir", str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me" and not jobs
    assert check_new_run_dir(tmp_path / "new", overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert check_new_run_dir(tmp_path / "empty", overwrite=False) is False


def test_resuming_a_finished_run_does_nothing(finished_run, jobs, capsys):
    before = _snapshot(finished_run)
    assert cli.main(["train", "--resume", str(finished_run)]) == 0
    err = capsys.readouterr().err
    assert f"{finished_run} is already complete (2 of run.iterations=2 iterations done)" in err
    assert f"--resume {finished_run} --set run.iterations=4" in err
    assert not jobs and _snapshot(finished_run) == before


def test_resume_says_where_it_continues_and_what_changed(finished_run, jobs, capsys):
    assert cli.main(["train", "--resume", str(finished_run), "--set", "run.iterations=5"]) == 0
    err = capsys.readouterr().err
    assert f"flowgrpo: resuming {finished_run} from iteration 2 of 5; run.iterations: 2 -> 5" in err
    assert jobs[0]["resume"] and jobs[0]["run_dir"] == finished_run and jobs[0]["config"].run.iterations == 5


def test_a_resume_records_its_config_and_what_changed(finished_run, tiny_config):
    config = tiny_config(f"prompts.train={PROMPTS}", "prompts.format=text", "run.iterations=5", "train.beta=0.01")
    assert RunFolder(finished_run).record_resume(config, 2) == {"run.iterations": [2, 5], "train.beta": [0.04, 0.01]}
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["run"]["iterations"] == 5 and saved["train"]["beta"] == 0.01
    RunFolder(finished_run).record_resume(config, 3)
    lines = [json.loads(line) for line in (finished_run / "resumes.jsonl").read_text().splitlines()]
    assert [(line["iteration"], line["changed"]) for line in lines] == [
        (2, {"run.iterations": [2, 5], "train.beta": [0.04, 0.01]}), (3, {})]
    assert all(line["time"] for line in lines)


@pytest.mark.parametrize("layout, words", [
    ("missing", "no such folder"),
    ("empty", "not a run folder"),
    ("no-checkpoint", "the run has no checkpoint yet"),
])
def test_resume_of_something_that_is_no_resumable_run(tmp_path, config_file, jobs, capsys, layout, words):
    run = tmp_path / "run"
    if layout != "missing":
        run.mkdir()
    if layout == "no-checkpoint":
        (run / "config.yaml").write_text(config_file.read_text())
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flowgrpo: error: --resume {run}: {words}") and err.count("\n") == 1
    assert "config file" not in err and not jobs
    with pytest.raises(RunFolderError):
        resume_point(run)


def test_resume_takes_no_other_config_or_folder(finished_run, config_file, jobs, capsys):
    assert cli.main(["train", "--resume", str(finished_run), "--config", str(config_file)]) == 2
    assert "--config: not with --resume" in capsys.readouterr().err and not jobs


def test_ctrl_c_ends_with_how_to_go_on(finished_run, monkeypatch, capsys):
    monkeypatch.setattr(job, "train", _raising(KeyboardInterrupt()))
    assert cli.main(["train", "--resume", str(finished_run), "--set", "run.iterations=4"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"flowgrpo: interrupted; continue from iteration 2 with "
                                    f"`flowgrpo train --resume {finished_run}`")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_ctrl_c_before_the_first_iteration_says_nothing_was_kept(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(job, "train", _raising(KeyboardInterrupt()))
    run = tmp_path / "new-run"
    assert cli.main(["train", "--config", str(config_file), "--run-dir", str(run)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"flowgrpo: interrupted; it stopped before its first iteration and left nothing in {run}")


def test_ray_logs_carry_no_colour_codes_into_a_file(monkeypatch):
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    logger = logging.getLogger("ray._private.worker")
    monkeypatch.setattr(logger, "filters", list(logger.filters))
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    logger.addHandler(handler)
    try:
        cluster.plain_ray_logs(io.StringIO())  # stderr redirected to a file: not a terminal
        logger.warning("Started a local Ray instance. View the dashboard at %s%s%s %s%s",
                       "\x1b[1m", "\x1b[32m", "http://127.0.0.1:8265", "\x1b[39m", "\x1b[22m")
    finally:
        logger.removeHandler(handler)
    assert captured.getvalue() == "Started a local Ray instance. View the dashboard at http://127.0.0.1:8265 \n"
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # Ray's `(Worker pid=...)` prefix, uncoloured


def test_a_terminal_keeps_rays_colours(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    logger = logging.getLogger("ray._private.worker")
    monkeypatch.setattr(logger, "filters", list(logger.filters))
    before = list(logger.filters)
    cluster.plain_ray_logs(Terminal())
    assert "RAY_COLOR_PREFIX" not in os.environ and logger.filters == before


def test_a_user_error_in_a_starting_worker_is_one_plain_line(config_file, tmp_path, monkeypatch, capsys):
    from ray.exceptions import RayActorError

    died = RayActorError(error_msg=(  # the text of Ray's ActorDiedError when a worker's __init__ raises
        "The actor died because of an error raised in its creation task, ray::Learner.__init__() (pid=2211, "
        "ip=127.0.0.1)\n  File \"services/learner/learner.py\", line 47, in __init__\n"
        "common.lora.LoraLoadError: lora.target_modules: ['no_such_layer'] does not fit SD3Transformer2DModel"))
    monkeypatch.setattr(job, "train", _raising(died))
    assert cli.main(["train", "--config", str(config_file), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "flowgrpo: error: lora.target_modules: ['no_such_layer'] does not fit SD3Transformer2DModel "
        "(raised in a worker as it started)")
    other = RayActorError(error_msg="The actor died unexpectedly before finishing this task.")
    monkeypatch.setattr(job, "train", _raising(other))
    with pytest.raises(RayActorError):  # not a user error: the traceback is the report
        cli.main(["train", "--config", str(config_file), "--run-dir", str(tmp_path / "run2")])


def test_pretrain_toy_refuses_a_folder_that_holds_something(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["pretrain-toy", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"OUT_DIR {out} is not empty" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
