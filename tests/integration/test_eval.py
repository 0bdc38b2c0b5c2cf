"""`flowgrpo eval` and the evaluation in training, on the session's Ray cluster with the
tiny model and GenEval's tiny random detector: the files and keys, GenEval's summary,
and that the command reproduces the numbers training logged for the same weights."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import Mask2FormerForUniversalSegmentation

from common.config import dump_config
from common.prompts import GENEVAL_TAGS
from services.controller.cli import main
from services.controller.job import train
from services.controller.preflight import prepare
from tests.helpers.tiny_rewards import COCO_NAMES, make_tiny_clip, make_tiny_mask2former

pytestmark = pytest.mark.ray
PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "geneval_metadata.jsonl"  # all six tags
ONE_WORKER_EACH = ["--set", "rollout.num_workers=1", "--set", "reward.num_workers=1"]
TABLE_KEYS = [f"geneval/{tag}" for tag in GENEVAL_TAGS] + ["geneval/overall", "geneval/strict", "images"]


@pytest.fixture(scope="module")
def config(tiny_config, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval-models")
    # the random detector made to see a bowl in every query: "a photo of a bowl" is right,
    # the other single objects wrong, so the accuracies are not all 0
    detector = make_tiny_mask2former(root / "detector")
    model = Mask2FormerForUniversalSegmentation.from_pretrained(detector)
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-10.0)
        model.class_predictor.bias[COCO_NAMES.index("bowl")] = 10.0
    model.save_pretrained(detector)
    return prepare(tiny_config(
        f"prompts.train={PROMPTS}", f"prompts.eval={PROMPTS}", "prompts.format=geneval",
        "reward.weights={geneval: 1.0}", "reward.eval=[brightness]", "reward.num_workers=2", "reward.num_cpus=0.25",
        f"reward.geneval.detector={detector}",
        f"reward.geneval.clip={make_tiny_clip(root / 'clip')}", "reward.geneval.device=cpu",
        "rollout.num_workers=2", "rollout.num_gpus=0", "rollout.num_cpus=0.5", "learner.num_gpus=0",
        "learner.num_cpus=0.5", "run.iterations=1", "run.checkpoint_every=1", "run.eval_every=1",
        "run.eval_images_per_prompt=2", "train.learning_rate=1e-2", "train.ema_every=1"))


@pytest.fixture(scope="module")
def trained(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    history = train(config, run_dir)
    return run_dir, history


def _without_time(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def test_training_evaluates_before_any_update_and_at_the_end(trained):
    run_dir, history = trained
    assert [row["iteration"] for row in map(json.loads, (run_dir / "eval.jsonl").read_text().splitlines())] == [0, 1]
    assert history[0]["time/evaluate"] > 0
    for it in (0, 1):
        metrics = json.loads((run_dir / "eval" / f"iter_{it:06d}.json").read_text())
        for key in TABLE_KEYS + ["brightness/mean", "groups_failed"]:
            assert key in metrics, key
        assert all(0.0 <= metrics[key] <= 1.0 for key in TABLE_KEYS[:-1])
        assert metrics["geneval/extra_objects"] >= 0
        assert metrics["geneval/single_object"] == pytest.approx(1 / 3)  # bowl, fork, ...: one of three right
        assert metrics["geneval/overall"] == pytest.approx(sum(metrics[f"geneval/{t}"] for t in GENEVAL_TAGS) / 6)
        assert metrics["images"] + metrics["images_failed"] == 20 * 2
        assert metrics["policy_version"] == it
        verdicts = pq.read_table(run_dir / "eval" / f"iter_{it:06d}.parquet")
        assert verdicts.num_rows == metrics["images"] and "image" not in verdicts.column_names
        tags = [json.loads(d)["geneval"]["tag"] for d in verdicts.column("details").to_pylist()]
        assert sorted(set(tags)) == sorted(GENEVAL_TAGS)
        for picture in (f"iter_{it:06d}.png", f"iter_{it:06d}_tags.png"):
            assert (run_dir / "eval" / picture).is_file(), picture


def test_eval_command_reproduces_the_checkpoints_evaluation(trained):
    run_dir, _ = trained
    logged = json.loads((run_dir / "eval" / "iter_000001.json").read_text())
    assert main(["eval", str(run_dir), "--checkpoint", "1", *ONE_WORKER_EACH]) == 0
    again = json.loads((run_dir / "eval" / "iter_000001.json").read_text())
    # the same EMA weights and seeds give the same images and verdicts, on fewer workers too
    assert _without_time(again) == _without_time(logged)


def test_eval_command_on_the_base_model_gives_the_row_before_training(trained, config, tmp_path):
    run_dir, _ = trained
    dump_config(config, tmp_path / "config.yaml")
    out = tmp_path / "base"
    command = ["eval", "--config", str(tmp_path / "config.yaml"), "--base", "--run-dir", str(out), *ONE_WORKER_EACH]
    assert main(command) == 0
    base = json.loads((out / "eval" / "iter_000000.json").read_text())
    assert _without_time(base) == _without_time(json.loads((run_dir / "eval" / "iter_000000.json").read_text()))


def test_eval_command_names_the_missing_checkpoint(trained, capsys):
    run_dir, _ = trained
    assert main(["eval", str(run_dir), "--checkpoint", "7"]) == 2
    assert "--checkpoint 7" in capsys.readouterr().err
