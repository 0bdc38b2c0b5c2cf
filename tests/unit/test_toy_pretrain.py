"""Pretraining the toy-world model: deterministic for a seed, a pipeline the loader reads,
scenes that decode to what the toy world draws, a loss that falls."""
import json

import numpy as np
import pytest
import torch

from common.models import load_pipeline
from common.toy_pretrain import MARKER, PretrainConfig, palette_latents, pretrain, scene_latents
from common.toy_world import MISCAPTION_RATE, render, sample_scene, split_prompts
from services.rollout.sampler import decode

SHORT = PretrainConfig(steps=3, batch_size=4, warmup=2, clip_steps=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    torch.set_num_threads(1)
    records = {name: pretrain(root / name, PretrainConfig(**{**SHORT.__dict__, "seed": seed}), progress=False)
               for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    return root, records


def test_same_seed_same_model_other_seed_other_model(pretrained):
    root, records = pretrained
    weights = {name: load_pipeline(str(root / name)).transformer.state_dict() for name in "abc"}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    text = {name: load_pipeline(str(root / name)).text_encoder.state_dict() for name in "ab"}
    assert all(torch.equal(text["a"][k], text["b"][k]) for k in text["a"])   # the contrastive stage too
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
    assert records["a"]["final_loss"] == records["b"]["final_loss"]
    marker = json.loads((root / "a" / MARKER).read_text())
    assert marker["steps_done"] == 3
    assert marker["miscaption_rate"] == MISCAPTION_RATE   # what its captions taught, for bench_toy_knowledge
    assert len(marker["clip_accuracy"]) == 2 and set(marker["clip_accuracy"][0]) == set(MISCAPTION_RATE)


def test_object_colours_lie_to_one_side_of_the_background_in_latent_space(pretrained):
    """What the near-white background is for (common.toy_world): the palette's latents
    minus the background's share a direction, so where objects go shows in the mean of
    a prompt's scenes. On mid grey the offsets nearly cancel (0.24 of their mean length)."""
    root, _ = pretrained
    latents = palette_latents(load_pipeline(str(root / "a")).vae)
    offsets = latents[1:] - latents[0]
    assert offsets.mean(dim=0).norm() > 0.8 * offsets.norm(dim=1).mean()


def test_saved_pipeline_decodes_scenes_as_the_world_draws_them(pretrained):
    root, _ = pretrained
    pipe = load_pipeline(str(root / "a"))
    assert pipe.vae_scale_factor == 8
    _, test = split_prompts()
    rng = np.random.default_rng(0)
    scenes = [sample_scene(m, rng) for m in test[:6]]
    images = decode(pipe, scene_latents(scenes, palette_latents(pipe.vae)))
    truth = np.stack([render(s, 64) for s in scenes])
    assert images.shape == truth.shape and np.abs(images.astype(int) - truth).max() <= 6


def test_loss_falls(tmp_path):
    torch.set_num_threads(1)
    record = pretrain(tmp_path / "m", PretrainConfig(steps=40, batch_size=8, warmup=5, clip_steps=2), progress=False)
    assert record["final_loss"] < 0.7 * record["first_loss"]


def test_shipped_model_is_found_from_any_directory_and_loads(tmp_path, monkeypatch):
    from pathlib import Path

    from common.config import load_config
    from services.controller.preflight import prepare

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    config = prepare(load_config(repo / "deploy" / "configs" / "toy_geneval.yaml"))
    assert Path(config.model.path) == repo / "common" / "toy_model"
    record = json.loads((Path(config.model.path) / MARKER).read_text())
    assert record["steps_done"] == record["config"]["steps"] and record["max_sequence_length"] == config.model.max_sequence_length
    pipe = load_pipeline(config.model.path)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.sample_size == 8
