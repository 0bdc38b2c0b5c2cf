"""The reward worker: weighted totals, groups dropped (never zero-filled) when a scorer
fails, times out or returns NaN, retries, metrics; and the scorer registry."""
import time

import numpy as np
import pytest

from common.config import ConfigError, GenevalConfig, OcrConfig, RewardConfig, load_config
from common.wire import details_column, make_rollout_batch
from services.reward import worker as worker_module
from services.reward.base import ScoreOutput, Scorer, ScorerNeeds
from services.reward.image_rewards import Brightness, JpegCompressibility
from services.reward.scorers import SCORERS, scorer_needs
from services.reward.worker import GroupFailure, RewardWorker


def rollout_batch(groups=(0, 0, 1, 1, 2, 2), size=16, seed=0):
    n = len(groups)
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, g in enumerate(groups):
        images[i, ..., 0] = 40 * g  # the red channel tells a scorer which group an image is from
    return make_rollout_batch(
        prompts=[f'prompt {g} "x"' for g in groups], prompt_index=list(groups), metadata=[{"g": g} for g in groups],
        images=images, latents=np.zeros((n, 2, 1, 1, 1), np.float32), timesteps=np.ones((n, 1)),
        log_probs=np.zeros((n, 1)), policy_version=3, rollout_worker="w0")


def group_of(image):
    return int(image[0, 0, 0]) // 40


class FailsOnGroup1(Scorer):
    name = "fails_on_group1"
    calls = 0

    def __init__(self, config):
        self.engine = "test"

    def _score(self, images, prompts, metadata):
        type(self).calls += 1
        if any(group_of(im) == 1 for im in images):
            raise RuntimeError("cannot score group 1")
        return ScoreOutput(scores=np.ones(len(images)), details=[{} for _ in images])


class NanOnGroup2(Scorer):
    name = "nan_on_group2"

    def __init__(self, config):
        self.engine = "test"

    def _score(self, images, prompts, metadata):
        scores = [np.nan if group_of(im) == 2 else 0.5 for im in images]
        return ScoreOutput(scores=np.array(scores), details=[{"error": "no text"} for _ in images])


class Echo(Scorer):
    """Scores 0.5 and says which prompt and group it saw, to check details stay on their row."""
    name = "echo"

    def __init__(self, config):
        self.engine = "test"

    def _score(self, images, prompts, metadata):
        return ScoreOutput(scores=np.full(len(images), 0.5),
                           details=[{"prompt": p, "group": np.int64(group_of(im))} for p, im in zip(prompts, images)])


class Slow(Scorer):
    name = "slow"

    def __init__(self, config):
        self.engine = "test"

    def _score(self, images, prompts, metadata):
        time.sleep(1.0)
        return ScoreOutput(scores=np.zeros(len(images)), details=[{} for _ in images])


@pytest.fixture(autouse=True)
def test_scorers(monkeypatch):
    monkeypatch.setattr(worker_module, "RETRY_BACKOFF_S", 0.0)
    for cls in (FailsOnGroup1, NanOnGroup2, Echo, Slow):
        monkeypatch.setitem(SCORERS, cls.name, cls)


def test_weights_combine_as_configured():
    batch = rollout_batch()
    worker = RewardWorker(RewardConfig(weights={"brightness": 2.0, "jpeg_compressibility": 0.5}))
    scored, failures = worker.score(batch)
    assert failures == [] and scored.num_rows == batch.num_rows
    images = list(np.asarray(batch.column("image").to_numpy_ndarray()))
    bright = Brightness(RewardConfig()).score(images, [""] * 6, [{}] * 6).scores
    jpeg = JpegCompressibility(RewardConfig()).score(images, [""] * 6, [{}] * 6).scores
    rewards = scored.column("rewards")
    np.testing.assert_allclose(rewards.field("brightness").to_numpy(), bright)
    np.testing.assert_allclose(rewards.field("jpeg_compressibility").to_numpy(), jpeg)
    np.testing.assert_allclose(scored.column("reward").to_numpy(), 2.0 * bright + 0.5 * jpeg)
    assert scored.column("policy_version").to_pylist() == [3] * 6  # the rest of the row travels on


def test_details_keep_every_scorers_verdict_on_its_row():
    worker = RewardWorker(RewardConfig(weights={"echo": 1.0, "jpeg_compressibility": 1.0, "fails_on_group1": 1.0},
                                       batch_size=2, retries=0))
    batch = rollout_batch()
    scored, _ = worker.score(batch)
    details = details_column(scored)
    assert [d["echo"] for d in details] == [{"prompt": p, "group": g}
                                            for p, g in zip(scored.column("prompt").to_pylist(), [0, 0, 2, 2])]
    kept = [i for i, g in enumerate(batch.column("prompt_index").to_pylist()) if g != 1]
    images = list(np.asarray(batch.column("image").to_numpy_ndarray())[kept])
    jpeg = JpegCompressibility(RewardConfig()).score(images, [""] * 4, [{}] * 4).details
    assert [d["jpeg_compressibility"] for d in details] == jpeg
    assert all(d["fails_on_group1"] == {} for d in details)


def test_evaluation_scorers_run_only_in_evaluation_and_stay_out_of_the_total():
    worker = RewardWorker(RewardConfig(weights={"brightness": 2.0}, eval=["echo"]))
    assert worker.engines() == {"brightness": "numpy-mean", "echo": "test"}  # loaded with the worker
    batch = rollout_batch()
    trained, _ = worker.score(batch)
    assert trained.column("rewards").type.names == ["brightness"]
    assert list(details_column(trained)[0]) == ["brightness"]
    evaluated, _ = worker.score(batch, evaluation=True)
    rewards = evaluated.column("rewards")
    assert rewards.type.names == ["brightness", "echo"]
    assert rewards.field("echo").to_pylist() == [0.5] * 6
    np.testing.assert_allclose(evaluated.column("reward").to_numpy(), 2.0 * rewards.field("brightness").to_numpy())
    assert list(details_column(evaluated)[0]) == ["brightness", "echo"]
    assert "image" in trained.column_names and "image" not in evaluated.column_names  # verdicts only
    assert worker.metrics()["echo/images"] == 6


def test_an_evaluation_scorer_that_fails_drops_the_group_in_evaluation_only():
    worker = RewardWorker(RewardConfig(weights={"brightness": 1.0}, eval=["fails_on_group1"], retries=0, batch_size=2))
    assert worker.score(rollout_batch())[1] == []
    scored, failures = worker.score(rollout_batch(), evaluation=True)
    assert scored.column("prompt_index").to_pylist() == [0, 0, 2, 2]
    assert [(f.prompt_index, f.scorer) for f in failures] == [(1, "fails_on_group1")]


def test_a_failing_scorer_fails_its_group_only():
    FailsOnGroup1.calls = 0
    worker = RewardWorker(RewardConfig(weights={"brightness": 1.0, "fails_on_group1": 1.0}, batch_size=2, retries=2))
    scored, failures = worker.score(rollout_batch())
    assert scored.column("prompt_index").to_pylist() == [0, 0, 2, 2]
    assert failures == [GroupFailure(1, "fails_on_group1", failures[0].reason)]
    assert "failed 3 time(s)" in failures[0].reason and "cannot score group 1" in failures[0].reason
    assert FailsOnGroup1.calls == 1 + 3 + 1  # group 1's call was tried once and retried twice
    m = worker.metrics()
    assert m["fails_on_group1/failed_calls"] == 1 and m["fails_on_group1/retries"] == 2
    assert m["failed_groups"] == 1


def test_a_failed_call_fails_every_group_in_it():
    worker = RewardWorker(RewardConfig(weights={"fails_on_group1": 1.0}, batch_size=4, retries=0))
    scored, failures = worker.score(rollout_batch())
    assert scored.column("prompt_index").to_pylist() == [2, 2]
    assert sorted(f.prompt_index for f in failures) == [0, 1]


def test_nan_fails_the_group_with_the_scorers_reason():
    worker = RewardWorker(RewardConfig(weights={"nan_on_group2": 1.0}))
    scored, failures = worker.score(rollout_batch())
    assert scored.column("prompt_index").to_pylist() == [0, 0, 1, 1]
    assert [(f.prompt_index, f.scorer) for f in failures] == [(2, "nan_on_group2")]
    assert "NaN" in failures[0].reason and "no text" in failures[0].reason
    assert worker.metrics()["nan_on_group2/nan_scores"] == 2


def test_a_call_past_the_timeout_fails_its_groups():
    worker = RewardWorker(RewardConfig(weights={"slow": 1.0}, timeout_s=0.2, retries=0))
    started = time.perf_counter()
    scored, failures = worker.score(rollout_batch(groups=(0, 0)))
    assert time.perf_counter() - started < 0.9
    assert scored.num_rows == 0
    assert "timeout_s=0.2" in failures[0].reason


def test_metrics_report_throughput_calls_and_engines():
    worker = RewardWorker(RewardConfig(weights={"brightness": 1.0}, batch_size=4))
    worker.score(rollout_batch())
    m = worker.metrics()
    assert m["brightness/calls"] == 2 and m["brightness/images_per_s"] > 0 and m["brightness/seconds_per_call"] > 0
    assert m["brightness/engine/numpy-mean"] == 1.0
    assert m["failed_groups"] == 0
    assert worker.engines() == {"brightness": "numpy-mean"}


def test_metrics_of_several_workers_combine_into_one():
    a, b = (RewardWorker(RewardConfig(weights={"brightness": 1.0}, batch_size=4)) for _ in range(2))
    a.score(rollout_batch())
    b.score(rollout_batch(groups=(0, 0)))
    ma, mb = a.metrics(), b.metrics()
    m = worker_module.combine_metrics([ma, mb])
    assert m["brightness/images"] == 8 and m["brightness/calls"] == 3
    assert m["brightness/seconds"] == pytest.approx(ma["brightness/seconds"] + mb["brightness/seconds"])
    assert m["brightness/images_per_s"] == pytest.approx(8 / m["brightness/seconds"])
    assert m["brightness/seconds_per_call"] == pytest.approx(m["brightness/seconds"] / 3)
    assert m["brightness/engine/numpy-mean"] == 2 and m["failed_groups"] == 0


def test_ocr_counts_reach_the_metrics():
    worker = RewardWorker(RewardConfig(weights={"ocr": 1.0}))
    batch = rollout_batch(groups=(0,), size=64)
    worker.score(batch)
    m = worker.metrics()
    assert m["ocr/empty"] == 1
    assert any(key.startswith("ocr/engine/rapidocr-") for key in m)


def test_an_ocr_engine_error_is_retried_then_its_group_dropped_and_counted(monkeypatch):
    from services.reward import ocr

    class CrashesOnGroup1(ocr.OcrEngine):
        name = "crashes-on-group-1"
        channel_order = "RGB"
        reads = 0

        def _read(self, image):
            type(self).reads += 1
            if group_of(image) == 1:
                raise RuntimeError("engine crashed")
            return [("x", 0.9)]

    monkeypatch.setattr(ocr, "make_engine", lambda config: CrashesOnGroup1())
    worker = RewardWorker(RewardConfig(weights={"ocr": 1.0}, batch_size=2, retries=2))
    scored, failures = worker.score(rollout_batch())
    assert scored.column("prompt_index").to_pylist() == [0, 0, 2, 2]
    assert scored.column("rewards").field("ocr").to_pylist() == [1.0] * 4  # no zero for the failed group
    assert [(f.prompt_index, f.scorer) for f in failures] == [(1, "ocr")]
    assert "engine crashed" in failures[0].reason and "failed 3 time(s)" in failures[0].reason
    assert CrashesOnGroup1.reads == 2 + 3 + 2
    m = worker.metrics()
    assert m["ocr/retries"] == 2 and m["ocr/failed_calls"] == 1 and m["failed_groups"] == 1


# ---------------------------------------------------------------- registry and needs

def test_registry_knows_every_configurable_scorer(monkeypatch):
    for name in (FailsOnGroup1.name, NanOnGroup2.name, Echo.name, Slow.name):
        monkeypatch.delitem(SCORERS, name)
    assert set(SCORERS) == set(RewardConfig.SCORER_NAMES)


def test_needs():
    cpu = RewardConfig(num_gpus=1.0, num_cpus=2.0)
    assert scorer_needs("brightness", cpu).num_gpus == 0.0
    assert scorer_needs("ocr", cpu).pip == ["rapidocr>=3.4", "onnxruntime>=1.20"]
    assert scorer_needs("ocr", cpu).num_gpus == 0.0
    gpu_ocr = RewardConfig(num_gpus=1.0, ocr=OcrConfig(engine="paddleocr", use_gpu=True))
    assert scorer_needs("ocr", gpu_ocr).pip == ["paddleocr>=3.0", "paddlepaddle-gpu>=3.0"]
    assert scorer_needs("ocr", gpu_ocr).num_gpus == 1.0
    assert scorer_needs("geneval", cpu).num_gpus == 1.0 and scorer_needs("geneval", cpu).num_cpus == 2.0
    assert scorer_needs("geneval", RewardConfig(num_gpus=1.0, geneval=GenevalConfig(device="cpu"))).num_gpus == 0.0
    remote = RewardConfig(num_gpus=1.0, endpoints={"geneval": "grpc://10.0.0.5:50051"})
    assert scorer_needs("geneval", remote) == scorer_needs("brightness", remote)


@pytest.mark.parametrize("overrides, field, words", [
    (["reward.weights={nope: 1.0}"], "reward.weights.nope", "unknown scorer 'nope'; known scorers: ocr, geneval"),
    (["reward.eval=[brightness, nope]"], "reward.eval[1]", "unknown scorer 'nope'; known scorers: ocr, geneval"),
    (["reward.eval=[geneval]", "reward.weights={geneval: 1.0}"], "reward.eval[0]", "already in reward.weights"),
    (["reward.eval=[brightness, brightness]"], "reward.eval[1]", "already listed"),
    (["reward.eval=[ocr]", "prompts.format=geneval"], "prompts.format", "set prompts.format: ocr"),
    (["reward.eval=[aesthetic]"], "reward.aesthetic.head", "sac+logos+ava1-l14-linearMSE.pth"),
    (["reward.eval=[aesthetic]", "reward.aesthetic.head=h.pth", "reward.aesthetic.device=cuda:0"],
     "reward.aesthetic.device", "num_gpus"),
    (["reward.weights={brightness: .nan}"], "reward.weights.brightness", "finite"),
    (["reward.endpoints={ocr: 'grpc://127.0.0.1:5000'}"], "reward.endpoints.ocr",
     "not a scorer of reward.weights or reward.eval"),
    (["reward.weights={ocr: 1.0}", "prompts.format=ocr", "reward.ocr.det_model_dir=/models/det"],
     "reward.ocr.det_model_dir", "together"),
    (["reward.weights={ocr: 1.0}", "prompts.format=ocr", "reward.ocr.use_gpu=true"], "reward.ocr.use_gpu", "num_gpus"),
    (["reward.weights={ocr: 1.0}", "prompts.format=ocr", "reward.ocr.min_confidence=1.5"],
     "reward.ocr.min_confidence", "[0, 1]"),
    (["reward.geneval.device=cuda"], "reward.geneval.device", "num_gpus"),
    (["reward.batch_size=0"], "reward.batch_size", "at least 1"),
    (["reward.geneval.reward=accuracy"], "reward.geneval.reward", "one of"),
])
def test_config_errors_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"{field}: " in str(err.value) and words in str(err.value)


def test_evaluation_scorers_may_be_remote_and_count_in_the_workers_needs():
    config = load_config(None, ["reward.eval=[brightness, aesthetic]", "reward.num_gpus=1",
                                "reward.endpoints={brightness: 'grpc://127.0.0.1:5000'}", "reward.aesthetic.head=h.pth",
                                "reward.geneval.device=cpu"])
    assert config.reward.all_scorers() == ["geneval", "brightness", "aesthetic"]
    assert [scorer_needs(name, config.reward).num_gpus for name in config.reward.all_scorers()] == [0.0, 0.0, 1.0]


def test_remote_scorers_skip_local_engine_checks():
    local = ["reward.weights={ocr: 1.0}", "prompts.format=ocr", "reward.ocr.use_gpu=true"]
    with pytest.raises(ConfigError, match="reward.ocr.use_gpu: needs reward.num_gpus > 0"):
        load_config(None, local)
    config = load_config(None, local + ["reward.endpoints={ocr: 'grpc://127.0.0.1:5000'}"])
    assert scorer_needs("ocr", config.reward) == ScorerNeeds(num_gpus=0.0, num_cpus=1.0, pip=[])  # the service's GPU
