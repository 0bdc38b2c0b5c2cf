"""The paper's evaluation without Ray: GenEval's summary and the metrics' keys from
synthetic verdicts, the test prompts and their seeds, the rollout worker's evaluation
samples, a checkpoint's EMA LoRA and what the run folder keeps of an evaluation."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors

from common import wire
from common.lora import lora_state_dict
from common.prompts import GENEVAL_TAGS
from services.controller import evaluation
from services.controller.run_folder import RunFolder
from services.learner.learner import Learner
from services.rollout.worker import RolloutWorker


def test_overall_is_the_mean_of_the_tags_not_of_the_images():
    # counting: 1 of 4 images right; each other tag: its one image right
    verdicts = [{"tag": "counting", "correct": i == 0, "strict": False, "extra_objects": i} for i in range(4)]
    verdicts += [{"tag": tag, "correct": True, "strict": True, "extra_objects": 0}
                 for tag in GENEVAL_TAGS if tag != "counting"]
    out = evaluation.geneval_summary(verdicts)
    assert out["geneval/counting"] == 0.25 and out["geneval/position"] == 1.0
    assert out["geneval/overall"] == pytest.approx((5 + 0.25) / 6)  # over the images it would be 6 / 9
    assert out["geneval/strict"] == pytest.approx(5 / 9)
    assert out["geneval/extra_objects"] == pytest.approx(6 / 9)


def test_a_tag_outside_genevals_is_refused():
    with pytest.raises(ValueError, match="unknown tags"):
        evaluation.geneval_summary([{"tag": "texture", "correct": True, "strict": True, "extra_objects": 0}])


def _scored_rows(n_per_tag=3):
    rng = np.random.default_rng(0)
    tags = [tag for tag in GENEVAL_TAGS for _ in range(n_per_tag)]
    n = len(tags)
    correct = rng.random(n) < 0.5
    geneval = np.where(correct, 1.0, rng.random(n) * 0.9)
    ocr, pick = rng.random(n), 0.8 + 0.1 * rng.random(n)
    details = [json.dumps({"geneval": {"tag": t, "correct": bool(c), "strict": bool(c and i % 2), "score": g,
                                       "extra_objects": i % 3},
                           "ocr": {"text": "abc", "target": "abd"}})
               for i, (t, c, g) in enumerate(zip(tags, correct, geneval))]
    rewards = pa.StructArray.from_arrays([pa.array(geneval), pa.array(ocr), pa.array(pick)],
                                         ["geneval", "ocr", "pickscore"])
    table = pa.table({"prompt": [f"p{i}" for i in range(n)], "prompt_index": np.arange(n), "seed": np.arange(n) + 100,
                      "rewards": rewards, "reward": geneval, "details": details})
    return table, tags, correct, ocr, pick


def test_summary_has_every_key_of_the_scorers_that_ran():
    rows, tags, correct, ocr, pick = _scored_rows()
    out = evaluation.summarize(rows, groups_failed=2, per_prompt=4)
    for key in ["geneval/overall", "geneval/strict", "ocr/accuracy", "pickscore/mean", "geneval/mean", "images"]:
        assert key in out, key
    for tag in GENEVAL_TAGS:
        expected = np.mean([c for t, c in zip(tags, correct) if t == tag])
        assert out[f"geneval/{tag}"] == pytest.approx(expected)
        assert 0.0 <= out[f"geneval/{tag}"] <= 1.0
    assert out["geneval/overall"] == pytest.approx(np.mean([out[f"geneval/{t}"] for t in GENEVAL_TAGS]))
    assert out["ocr/accuracy"] == pytest.approx(ocr.mean())
    assert out["pickscore/mean"] == pytest.approx(26 * pick.mean())  # the paper's table unit
    assert (out["images"], out["groups_failed"], out["images_failed"]) == (len(tags), 2.0, 8.0)


def test_test_prompts_are_the_distinct_ones_in_file_order(tiny_config, tmp_path):
    lines = [{"tag": "single_object", "include": [{"class": c, "count": 1}], "prompt": f"a photo of a {c}"}
             for c in ["bowl", "cat", "bowl", "dog", "cat"]]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = tiny_config(f"prompts.eval={path}", "prompts.format=geneval", f"prompts.train={path}")
    assert [r.prompt for r in evaluation.eval_records(config)] == ["a photo of a bowl", "a photo of a cat",
                                                                   "a photo of a dog"]
    limited = tiny_config(f"prompts.eval={path}", "prompts.format=geneval", f"prompts.train={path}",
                          "run.eval_prompts=2")
    assert len(evaluation.eval_records(limited)) == 2


def test_image_seeds_depend_on_the_run_seed_prompt_and_image_only():
    seeds = {evaluation.image_seed(42, p, k) for p in range(100) for k in range(4)}
    assert len(seeds) == 400
    assert evaluation.image_seed(42, 3, 1) == evaluation.image_seed(42, 3, 1) != evaluation.image_seed(43, 3, 1)


def test_evaluation_is_due_at_zero_every_n_and_at_the_end(tiny_config):
    run = tiny_config("run.eval_every=3", "run.iterations=7").run
    assert [d for d in range(8) if evaluation.is_due(d, run)] == [0, 3, 6, 7]
    assert not any(evaluation.is_due(d, tiny_config("run.eval_every=0").run) for d in range(8))


def test_chunks_hold_whole_prompts():
    chunks = evaluation.plan_chunks(5, per_prompt=4, batch_size=8)
    assert [c.prompts for c in chunks] == [[0, 1], [2, 3], [4]]
    assert [c.prompts for c in evaluation.plan_chunks(2, per_prompt=4, batch_size=2)] == [[0], [1]]


@pytest.fixture(scope="module")
def rollout(tiny_config):
    return RolloutWorker(tiny_config("sample.batch_size=2"))


def test_each_evaluation_image_comes_from_its_own_seed(rollout):
    batch = rollout.evaluate(["a red cat"], [7], [{"k": 1}], [[11, 12]])
    swapped = rollout.evaluate(["a red cat"], [7], [{"k": 1}], [[12, 11]])
    images = wire.tensor_column(batch, "image")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    assert np.array_equal(wire.tensor_column(swapped, "image"), images[::-1])  # the seed, not the position, decides
    assert batch.column("seed").to_pylist() == [11, 12]
    assert batch.column("prompt_index").to_pylist() == [7, 7]
    assert batch.column("policy_version").to_pylist() == [0, 0]
    assert wire.metadata_column(batch) == [{"k": 1}, {"k": 1}]


def test_a_checkpoints_ema_lora_is_what_the_learner_publishes(tiny_config, rollout):
    learner = Learner(tiny_config("train.ema=true", "train.ema_every=1"))
    with torch.no_grad():
        for _ in range(3):
            for p in learner.params:
                p.add_(0.05 * torch.randn_like(p))
            learner.ema.step()
    lora = lora_state_dict(learner.transformer)
    # a state as a checkpoint keeps it: the LoRA by name (here in sorted order, as
    # safetensors stores names), the EMA's shadows in the parameters' order
    state = {"version": 3, "lora": {k: lora[k].detach().clone() for k in sorted(lora)},
             "ema": {"steps": 3, "shadow": [s.clone() for s in learner.ema.shadow]}}
    assert list(state["lora"]) != list(lora)  # the names' order alone would pair the wrong tensors
    packed, published = evaluation.ema_lora(state, rollout.lora_names()), learner.weights(ema=True)
    ema, expected = load_safetensors(packed.data), load_safetensors(published.data)
    assert ema.keys() == expected.keys()
    assert all(torch.equal(ema[k], expected[k]) for k in expected)
    assert any(not torch.equal(ema[k], lora[k]) for k in lora)  # the EMA, not the current LoRA
    assert packed.version == 3
    plain = load_safetensors(evaluation.ema_lora({**state, "ema": None}, rollout.lora_names()).data)
    assert all(torch.equal(plain[k], lora[k]) for k in lora)


def test_run_folder_keeps_an_evaluation(tmp_path):
    rows, *_ = _scored_rows()
    metrics = evaluation.summarize(rows, 0, 1)
    images = np.zeros((4, 32, 32, 3), np.uint8)
    with RunFolder(tmp_path) as folder:
        path = folder.write_eval(5, metrics, rows, images, ["a"] * 4, [1.0, 0.0, 1.0, 1.0], "correct")
        folder.write_eval(0, metrics, rows, images[:0], [], [], "correct")
        folder.write_eval(5, {**metrics, "images": 1.0}, rows, images, ["a"] * 4, [1.0] * 4, "correct")
    assert json.loads(path.read_text()) == {**metrics, "images": 1.0}
    assert pq.read_table(tmp_path / "eval" / "iter_000005.parquet").column_names == rows.column_names
    assert (tmp_path / "eval" / "iter_000005.png").is_file() and (tmp_path / "eval" / "iter_000005_tags.png").is_file()
    assert [(r["iteration"], r["images"]) for r in folder.read_eval()] == [(0, metrics["images"]), (5, 1.0)]
    assert (tmp_path / "tensorboard").is_dir()


@pytest.mark.parametrize("argv, flag", [
    (["eval"], "RUN_DIR"),
    (["eval", "--base", "--checkpoint", "3"], "--checkpoint"),
    (["eval", "runs/x", "--config", "c.yaml"], "--config"),
    (["eval", "/nonexistent/run"], "RUN_DIR /nonexistent/run"),
])
def test_eval_command_refuses_what_does_not_fit_before_starting_anything(argv, flag, capsys):
    from services.controller.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowgrpo: error: ") and flag in err and len(err.strip().splitlines()) == 1
