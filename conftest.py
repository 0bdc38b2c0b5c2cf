"""Test-wide environment: fully offline, Ray on loopback only, and shared fixtures.

The variables are set at import, before any test module imports Ray or a hub client:
Ray reads them when it starts, huggingface_hub when it is imported.
"""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray socket listens on 127.0.0.1
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)  # never join a cluster the developer happens to run
os.environ["RAY_metrics_report_interval_ms"] = "500"  # dashboard gauges show up within a second
os.environ["RAY_health_check_period_ms"] = "500"  # a killed node is marked dead in ~2 s, not 15 s (test_node_loss)
os.environ["RAY_health_check_failure_threshold"] = "3"

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny SD3.5-architecture pipeline ("s"), built once per session and saved."""
    from common.models import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-s", preset="s", seed=0))


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir):
    """A factory of small, fast configs on the tiny model: tiny_config("train.beta=0", ...)."""
    from common.config import load_config

    base = [
        f"model.path={tiny_model_dir}", "model.max_sequence_length=16", "sample.resolution=32",
        "sample.train_steps=4", "sample.eval_steps=6", "sample.group_size=4", "sample.prompts_per_iteration=2",
        "sample.batch_size=8", "train.micro_batch_size=4", "lora.rank=4", "lora.alpha=8",
        "reward.weights={brightness: 1.0}", "run.num_torch_threads=1",
    ]

    def make(*overrides):
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def run_config(tiny_config, ray_cluster):
    """A factory of configs for whole runs on the session's Ray cluster: the tiny model,
    a text prompt file, CPU shares that fit 2 CPUs, 4 images a rollout call; the
    overrides (dotted keys) add the rest."""
    from services.controller.preflight import prepare

    prompts = Path(__file__).resolve().parent / "tests" / "fixtures" / "prompts" / "pickscore.txt"

    def make(*overrides):
        return prepare(tiny_config(
            f"prompts.train={prompts}", "prompts.format=text", "rollout.num_gpus=0", "rollout.num_cpus=0.5",
            "learner.num_gpus=0", "learner.num_cpus=0.5", "reward.num_cpus=0.25", "sample.batch_size=4",
            "train.learning_rate=1e-2", *overrides))

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on loopback for the whole session (starting one costs seconds).
    Logical CPUs: enough for 2 rollout workers, a learner and a reward worker of the tests."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=port, log_to_driver=False)
    yield {"metrics_port": port}
    ray.shutdown()
