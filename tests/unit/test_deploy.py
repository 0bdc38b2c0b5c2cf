"""The deploy/ folder: configs load and carry the paper's values, the Grafana dashboard covers
the controller's gauges, the cluster manifests parse and run `flowgrpo train`, scripts parse."""
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import ATTENTION_PROJECTIONS, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIGS = sorted((DEPLOY / "configs").glob("*.yaml"))
PAPER_BETA = {"geneval": 0.04, "ocr": 0.04, "pickscore": 0.01}
PAPER_EVAL_IMAGES = {"geneval": 4, "ocr": 1, "pickscore": 1}  # images per distinct test prompt
PROMPTS = {  # task: (train, eval, format)
    "geneval": ("geneval/train_metadata.jsonl", "geneval/test_metadata.jsonl", "geneval"),
    "ocr": ("ocr/train.txt", "ocr/test.txt", "ocr"),
    "pickscore": ("pickscore/train.txt", "pickscore/test.txt", "text"),
}


def test_the_sd35_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {f"sd35_{task}.yaml" for task in PAPER_BETA} <= names


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_value_a_config_sets_is_the_one_loaded(path, tmp_path):
    """Each key of the file reaches the typed config with the file's value (none falls back
    to a default), and the config written back (as a run's config.yaml) loads the same."""
    config = load_config(path)
    loaded = _leaves(dataclasses.asdict(config))
    for key, value in _leaves(yaml.safe_load(path.read_text())).items():
        assert loaded[key] == (float(value) if isinstance(loaded[key], float) else value), key
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_the_tiny_config_fits_two_cpu_cores_and_no_gpu():
    c = load_config(DEPLOY / "configs" / "tiny_cpu.yaml")
    cpus = c.rollout.num_workers * c.rollout.num_cpus + c.learner.num_cpus + c.reward.num_workers * c.reward.num_cpus
    gpus = c.rollout.num_workers * c.rollout.num_gpus + c.learner.num_gpus + c.reward.num_workers * c.reward.num_gpus
    assert cpus <= 2 and gpus == 0 and c.model.tiny_preset is not None


@pytest.mark.parametrize("task", sorted(PAPER_BETA))
def test_sd35_configs_carry_the_papers_settings(task):
    c = load_config(DEPLOY / "configs" / f"sd35_{task}.yaml")
    assert c.model.path == "stabilityai/stable-diffusion-3.5-medium" and c.model.tiny_preset is None
    assert c.model.precision == "fp16-mixed" and c.model.max_sequence_length == 128
    s = c.sample
    assert (s.resolution, s.train_steps, s.eval_steps, s.guidance_scale, s.noise_level) == (512, 10, 40, 4.5, 0.7)
    assert (s.group_size, s.prompts_per_iteration) == (24, 48)
    t = c.train
    assert (t.learning_rate, t.clip_range, t.beta, t.timestep_fraction) == (3e-4, 1e-4, PAPER_BETA[task], 0.99)
    assert (t.optimizer_steps_per_iteration, t.inner_epochs, t.adv_clip_max, t.max_grad_norm) == (2, 1, 5.0, 1.0)
    assert t.global_std and t.ema and (t.ema_decay, t.ema_every) == (0.9, 8)
    assert (c.lora.rank, c.lora.alpha, c.lora.init) == (32, 64.0, "gaussian")
    assert sorted(c.lora.target_modules) == sorted(ATTENTION_PROJECTIONS)
    assert c.reward.weights == {task: 1.0} and not c.reward.endpoints
    assert (c.prompts.train, c.prompts.eval, c.prompts.format) == PROMPTS[task]
    # every GPU of the 16 the examples ask for hosts a rollout worker and a learner rank (the
    # paper's schedule), the reward workers share what is left
    assert c.placement == "colocated" and c.rollout.num_workers == c.learner.num_workers
    assert c.rollout.num_gpus + c.learner.num_gpus == 1
    assert c.rollout.num_workers + c.reward.num_workers * c.reward.num_gpus == 16
    assert c.run.mode == "sync"
    # the paper's evaluation: the whole test split, GenEval's 553 prompts x 4 images, OCR's and PickScore's x 1
    assert (c.run.eval_every, c.run.eval_prompts, c.run.eval_images_per_prompt) == (60, 0, PAPER_EVAL_IMAGES[task])


# ---------------------------------------------------------------- Grafana

def _dashboard():
    return json.loads((DEPLOY / "grafana" / "flowgrpo_dashboard.json").read_text())


def test_grafana_panels_query_the_flowgrpo_gauges():
    from services.controller.dashboard import _GAUGES

    dash = _dashboard()
    panels = dash["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    exprs = []
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "ray_flowgrpo_" in target["expr"], (panel["title"], target["expr"])
            assert target["datasource"]["uid"] == "${datasource}"
            exprs.append(target["expr"])
    # every gauge the controller exports has a panel, under Ray's `ray_` prefix
    for name, _, _ in _GAUGES.values():
        assert any(re.search(rf"\bray_{name}\b", e) for e in exprs), name
    phase = [p for p in panels if any("ray_flowgrpo_phase" in t["expr"] for t in p["targets"])]
    assert phase[0]["type"] == "state-timeline" and "== 1" in phase[0]["targets"][0]["expr"]


def test_grafana_has_a_prometheus_datasource_variable():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


# ---------------------------------------------------------------- cluster manifests

def _dockerfile_ray_version() -> str:
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M)
    assert m, "deploy/docker/Dockerfile: no ARG RAY_VERSION=..."
    return m.group(1)


def _config_of(command: str) -> Path:
    m = re.search(r"flowgrpo train --config (\S+)", command)
    assert m, command
    return REPO / m.group(1)


def test_rayjob_runs_flowgrpo_train_on_gpu_workers():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("flowgrpo train --config deploy/configs/sd35_geneval.yaml")
    assert _config_of(spec["entrypoint"]).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _dockerfile_ray_version()
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    assert workers
    have = {"GPU": 0, "CPU": 0}
    for group in workers:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["image"]
        limits = container["resources"]["limits"]
        have["GPU"] += int(limits["nvidia.com/gpu"]) * group["replicas"]
        have["CPU"] += int(limits["cpu"]) * group["replicas"]
    # the head starts with num-cpus 0, so the workers alone must hold the run's actors
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    c = load_config(_config_of(spec["entrypoint"]))
    for kind, key in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
        need = (c.rollout.num_workers * getattr(c.rollout, key) + getattr(c.learner, key)
                + c.reward.num_workers * getattr(c.reward, key))
        assert have[kind] >= need, kind


def test_cluster_launcher_config_parses_and_has_gpu_workers():
    text = (DEPLOY / "ray" / "cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert any(t.get("min_workers", 0) >= 1 for name, t in types.items() if name != cluster["head_node_type"])
    assert any("--head" in cmd for cmd in cluster["head_start_ray_commands"])
    assert all("--metrics-export-port" in " ".join(cluster[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert _config_of(text).is_file()  # the submit example in its header


def test_dockerfile_installs_the_project():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    assert 'pip install -e ".[ocr]"' in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", sorted((DEPLOY / "jobs").glob("*.sh")), ids=lambda p: p.name)
def test_job_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_configs_named_in_deploy_exist():
    named = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".sh", ".yaml", ".json", "") and "prompts" not in path.parts:
            named |= set(re.findall(r"deploy/configs/[\w.-]+\.yaml", path.read_text(errors="replace")))
    assert named
    for name in named:
        assert (REPO / name).is_file(), name


def test_the_readme_describes_the_tiny_config_as_it_is():
    """The README's first run and the tiny config's header tell the same run: its
    iterations, images per iteration and measured seconds of training."""
    readme = (REPO / "README.md").read_text()
    header = (DEPLOY / "configs" / "tiny_cpu.yaml").read_text()
    c = load_config(DEPLOY / "configs" / "tiny_cpu.yaml")
    m = re.search(r"trains (\d+) iterations of (\d+) images", readme)
    assert m and (int(m.group(1)), int(m.group(2))) == (c.run.iterations, c.sample.group_size * c.sample.prompts_per_iteration)
    readme_seconds = re.search(r"\((\d+) s of\s+training", readme)
    header_seconds = re.search(r"\((\d+) s of training\)", header)
    assert readme_seconds and header_seconds and readme_seconds.group(1) == header_seconds.group(1)
