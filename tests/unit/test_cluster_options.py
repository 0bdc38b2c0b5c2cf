"""Reward workers are placed and isolated by what their scorers declare."""
from common.config import load_config
from services.controller.cluster import reward_worker_options
from services.reward.scorers import scorer_needs


def _options(*overrides):
    config = load_config(None, ["prompts.format=ocr", *overrides])
    return reward_worker_options(config, [scorer_needs(n, config.reward) for n in config.reward.weights])


def test_cpu_scorers_ask_for_no_gpu():
    options = _options("reward.weights={ocr: 0.5, brightness: 0.5}", "reward.num_gpus=1", "reward.num_cpus=2")
    assert options["num_gpus"] == 0.0 and options["num_cpus"] == 2.0
    assert "runtime_env" not in options
    assert options["max_restarts"] == -1


def test_gpu_scorer_gets_the_configured_gpu_share():
    options = _options("reward.weights={pickscore: 1.0, ocr: 0.0}", "reward.num_gpus=0.5")
    assert options["num_gpus"] == 0.5


def test_isolated_env_carries_the_engines_packages():
    options = _options("reward.weights={ocr: 1.0}", "reward.isolated_env=true")
    assert options["runtime_env"]["pip"] == ["onnxruntime>=1.20", "rapidocr>=3.4"]
