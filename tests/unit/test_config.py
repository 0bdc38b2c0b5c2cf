"""Config loading: errors name the dotted field, YAML round-trips, overrides apply."""
import pytest
import yaml

from common.config import ConfigError, dump_config, load_config


def test_defaults_are_the_papers_sd35_settings():
    c = load_config()
    assert (c.sample.train_steps, c.sample.eval_steps, c.sample.guidance_scale, c.sample.noise_level) == (10, 40, 4.5, 0.7)
    assert (c.sample.group_size, c.sample.prompts_per_iteration) == (24, 48)
    assert (c.train.learning_rate, c.train.clip_range, c.train.beta, c.train.timestep_fraction) == (3e-4, 1e-4, 0.04, 0.99)
    assert (c.lora.rank, c.lora.alpha, c.lora.init) == (32, 64.0, "gaussian")
    assert "attn.to_add_out" in c.lora.target_modules


@pytest.mark.parametrize("override, field, words", [
    (["sample.colour=1"], "sample.colour", "unknown key"),
    (["colour=1"], "colour", "unknown key"),
    (["train.learning_rate=fast"], "train.learning_rate", "expected a number"),
    (["sample.group_size=2.5"], "sample.group_size", "whole number"),
    (["train.ema=maybe"], "train.ema", "true or false"),
    (["sample.group_size=1"], "sample.group_size", "at least 2"),
    (["sample.noise_level=1.5"], "sample.noise_level", "[0, 1]"),
    (["sample.noise_level=-0.1"], "sample.noise_level", "[0, 1]"),
    (["sample.group_size=6", "sample.batch_size=4"], "sample.batch_size", "divide"),
    (["run.mode=fast"], "run.mode", "one of"),
    (["lora.target_modules=[]"], "lora.target_modules", "at least one"),
    (["reward.weights={}"], "reward.weights", "at least one"),
    (["reward.endpoints={ocr: 'localhost:5000'}"], "reward.endpoints.ocr", "grpc://"),
    (["train.timestep_fraction=0.05"], "train.timestep_fraction", "trains no step"),
    (["sample.resolution=100"], "sample.resolution", "multiple of 16"),
    (["reward.weights={ocr: 1.0}", "prompts.format=text"], "prompts.format", "set prompts.format: ocr"),
    (["reward.weights={geneval: 1.0}", "prompts.format=text"], "prompts.format", "set prompts.format: geneval"),
    (["rollout.num_cpus=-1"], "rollout.num_cpus", ">= 0"),
    (["rollout.num_gpus=1.5"], "rollout.num_gpus", "whole number of GPUs"),
    (["learner.num_cpus=-1"], "learner.num_cpus", ">= 0"),
    (["learner.num_gpus=-1"], "learner.num_gpus", ">= 0"),
    (["learner.num_torch_threads=-2"], "learner.num_torch_threads", "unset: run.num_torch_threads"),
    (["run.num_torch_threads=-1"], "run.num_torch_threads", ">= 0"),
    (["reward.num_cpus=-0.5"], "reward.num_cpus", ">= 0"),
    (["rollout.resources={GPU: 1}"], "rollout.resources.GPU", "rollout.num_gpus"),
    (["rollout.resources={rollout_node: 0}"], "rollout.resources.rollout_node", "positive"),
])
def test_errors_name_the_flag_and_the_field(override, field, words):
    """The error starts with the --set the user typed that gave the bad field."""
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    keys = {item: item.split("=")[0] for item in override}
    culprit = next(item for item, key in keys.items() if field == key or field.startswith(key + "."))
    assert str(err.value).startswith(f"--set {culprit}: {field}:")
    assert words in str(err.value)


def test_a_bad_set_is_blamed_on_the_flag_not_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("sample:\n  group_size: 8\n  batch_size: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(good, ["run.iterations=0"])
    assert str(err.value) == "--set run.iterations=0: run.iterations: must be at least 1"
    # a value that is fine alone but clashes with the file: still the flag's fault
    with pytest.raises(ConfigError, match=r"^--set sample.group_size=6: sample.batch_size: must divide"):
        load_config(good, ["sample.group_size=6"])
    # the file's own error stays the file's, whatever else is set
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=r"^\S*bad.yaml: train.beta: must be >= 0"):
        load_config(bad, ["run.iterations=5"])


def test_a_set_value_that_is_not_yaml_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--set run.name=\{a: the value is not valid YAML"):
        load_config(None, ["run.name={a"])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.beta: must be >= 0"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    c = load_config(None, ["train.learning_rate=1e-4", "reward.weights={ocr: 0.5, pickscore: 0.5}", "run.name=x",
                           "prompts.format=ocr", "prompts.train=ocr/train.txt"])
    assert c.train.learning_rate == 1e-4  # PyYAML reads 1e-4 as a string; the loader accepts it
    dump_config(c, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == c
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["reward"]["weights"] == {"ocr": 0.5, "pickscore": 0.5}


def test_overrides_need_key_and_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["run.iterations"])
