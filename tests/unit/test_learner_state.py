"""The learner's checkpoint state without pickle: safetensors for tensors, JSON for the rest;
a learner loaded from it continues exactly as the one that saved it."""
import json

import pytest
import torch
from safetensors.torch import load as load_tensors

from common import wire
from common.lora import lora_state_dict
from common.prompts import PromptRecord, PromptStream
from services.controller.iteration import assign_advantages
from services.learner import state as learner_state
from services.learner.learner import Learner
from services.reward.worker import RewardWorker
from services.rollout.worker import RolloutWorker

PROMPTS = [PromptRecord("a red cat"), PromptRecord("a blue dog"), PromptRecord("a green car")]


@pytest.fixture(scope="module")
def trained(tiny_config):
    """A learner after one update (optimizer moments, EMA shadows and RNG all moved) and
    the scored batch of a second one."""
    config = tiny_config("train.ema=true", "train.ema_every=1", "train.learning_rate=1e-2", "train.inner_epochs=2")
    learner, rollout, reward = Learner(config), RolloutWorker(config), RewardWorker(config.reward)
    stream = PromptStream(PROMPTS, seed=0)

    def scored_batch(seed):
        draws = stream.next_batch(2)
        batch = rollout.generate([r.prompt for _, r in draws], [i for i, _ in draws], [{}] * 2, seed)
        data, _ = assign_advantages(wire.concat([reward.score(batch)[0]]), config.train)
        return data, batch

    learner.train(*scored_batch(1))
    return config, learner, scored_batch(2)


def test_state_is_safetensors_and_json_only(trained):
    _, learner, _ = trained
    blob, meta = learner.state_dict()
    meta = json.loads(json.dumps(meta))  # as read back from learner.json
    tensors = load_tensors(blob)
    assert {key.split("/")[0] for key in tensors} == {"lora", "optimizer", "ema"}
    assert meta["version"] == 1 and meta["ema_steps"] == learner.ema.steps > 0
    assert meta["optimizer"]["param_groups"][0]["lr"] == 1e-2
    assert len(meta["generator"]) == learner.generator.get_state().numel()
    for key, value in lora_state_dict(learner.transformer).items():
        assert torch.equal(tensors[f"lora/{key}"], value.cpu())


def test_a_loaded_learner_continues_exactly(trained):
    config, learner, (data, batch) = trained
    blob, meta = learner.state_dict()
    fresh = Learner(config)
    fresh.load_state_dict(blob, json.loads(json.dumps(meta)))
    assert fresh.version == learner.version
    assert torch.equal(fresh.generator.get_state(), learner.generator.get_state())
    saved, loaded = learner.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]  # betas back as a tuple
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    # the next update (random minibatch order, Adam moments, EMA) is the same in both
    a, b = learner.train(data, batch), fresh.train(data, batch)
    assert {k: v for k, v in a.items() if k != "learn_seconds"} == {k: v for k, v in b.items() if k != "learn_seconds"}
    after_a, after_b = lora_state_dict(learner.transformer), lora_state_dict(fresh.transformer)
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)
    assert all(torch.equal(x, y) for x, y in zip(learner.ema.shadow, fresh.ema.shadow))


def test_a_resumed_learner_takes_the_configs_optimizer_settings(trained, tiny_config):
    """`flowgrpo train --resume RUN --set train.learning_rate=...`: the checkpoint's Adam
    moments are kept, its saved settings give way to the config's."""
    _, learner, _ = trained
    blob, meta = learner.state_dict()
    fresh = Learner(tiny_config("train.ema=true", "train.learning_rate=2e-4", "train.adam_beta1=0.5"))
    fresh.load_state_dict(blob, json.loads(json.dumps(meta)))
    group = fresh.optimizer.param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)
    saved = learner.optimizer.state_dict()["state"]
    assert all(torch.equal(fresh.optimizer.state_dict()["state"][i]["exp_avg"], saved[i]["exp_avg"]) for i in saved)


@pytest.mark.parametrize("overrides, threads", [
    (["run.num_torch_threads=1"], 1),
    (["run.num_torch_threads=1", "learner.num_torch_threads=2"], 2),
])
def test_the_learner_takes_its_own_thread_count(tiny_config, overrides, threads):
    """`learner.num_torch_threads`, unset: `run.num_torch_threads` (a sync run on a CPU gives
    the update every core while one-thread rollout workers wait)."""
    before = torch.get_num_threads()
    try:
        Learner(tiny_config(*overrides))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_another_format_is_refused_with_the_way_out(trained):
    _, learner, _ = trained
    blob, meta = learner.state_dict()
    with pytest.raises(ValueError, match="format 0 is not 1.*that version"):
        learner_state.unpack(blob, {**meta, "format": 0})
