"""The data-parallel learner group (gloo on the CPU) and colocated placement."""
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load as load_safetensors

from common import wire
from common.lora import lora_state_dict
from services.controller.iteration import assign_advantages
from services.controller.job import train
from services.controller.learner_group import LearnerGroup
from services.controller.preflight import prepare
from services.learner.learner import Learner
from services.reward.worker import RewardWorker
from services.rollout.worker import RolloutWorker

pytestmark = pytest.mark.ray
PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "pickscore.txt"


def _iteration_data(config):
    """Four rollout calls of one prompt each, scored, with advantages; the first call's
    group gets zero advantages, so rank 0 (calls 0 and 2) trains one group and rank 1
    (calls 1 and 3) two."""
    rollout, reward = RolloutWorker(config), RewardWorker(config.reward)
    batches = [rollout.generate([p], [i], [{}], seed=i) for i, p in enumerate(["a red cat", "a blue dog",
                                                                               "a green car", "a yellow bus"])]
    scored = wire.concat([reward.score(b)[0] for b in batches])
    data, _ = assign_advantages(scored, config.train)
    advantages = data.column("advantage").to_numpy().copy()
    advantages[: config.sample.group_size] = 0.0
    data = wire.with_advantages(data.drop_columns(["advantage"]), advantages)
    calls = np.repeat(np.arange(4), config.sample.group_size)
    return data, batches, calls


def test_two_learners_take_the_update_of_one(tiny_config, ray_cluster):
    """With one optimizer step per iteration the steps hold the same micro-batches however
    they are spread over ranks: two ranks must then give one learner's LoRA."""
    config = tiny_config("learner.num_workers=2", "learner.num_cpus=0.25", "learner.num_gpus=0",
                         "sample.batch_size=4", "train.micro_batch_size=4", "train.optimizer_steps_per_iteration=1",
                         "train.inner_epochs=2",
                         # Adam divides by sqrt(v): on a weight whose gradient is ~0, float-order
                         # noise in the sum (two ranks' all-reduce against one rank's loop) becomes
                         # a full-size step. An eps far above sqrt(v) keeps the update linear in
                         # the gradient, so the comparison measures the gradients the ranks sum.
                         "train.adam_eps=1.0", "train.learning_rate=1.0",
                         "train.beta=0.04", "train.clip_range=10")
    data, batches, calls = _iteration_data(config)
    single = Learner(config)  # one rank: world size 1
    expected = single.train(data, *batches)
    group = LearnerGroup(Learner, config)
    try:
        metrics = group.train(data, [ray.put(b) for b in batches], calls)
        ours = load_safetensors(ray.get(group.weights()).data)
        digests = ray.get([a.digest.remote() for a in group.actors])
    finally:
        group.stop()
    reference = lora_state_dict(single.transformer)
    assert digests[0] == digests[1]  # both ranks hold the same LoRA (and EMA)
    assert set(ours) == set(reference)
    moved = max(float((reference[k] - single_init).abs().max()) for k, single_init in
                lora_state_dict(Learner(config).transformer).items())
    assert moved > 1e-4  # the update did something to compare
    for key, value in reference.items():
        assert torch.allclose(ours[key], value, atol=1e-6, rtol=1e-5), key
    assert metrics["samples_trained"] == expected["samples_trained"] == 3 * config.sample.group_size
    assert metrics["learner_ranks"] == 2


def test_colocated_placement_runs_end_to_end(tiny_config, ray_cluster, tmp_path):
    config = prepare(tiny_config(
        f"prompts.train={PROMPTS}", "prompts.format=text", "placement=colocated",
        "rollout.num_workers=2", "learner.num_workers=2", "rollout.num_gpus=0", "learner.num_gpus=0",
        "rollout.num_cpus=0.25", "learner.num_cpus=0.25", "reward.num_cpus=0.25",
        "sample.batch_size=4", "run.iterations=2", "run.checkpoint_every=0", "run.sample_images_every=0"))
    history = train(config, tmp_path / "run")
    assert [h["policy_version"] for h in history] == [1.0, 2.0]
    assert all(h["learner_ranks"] == 2 for h in history if h.get("samples_trained"))
    assert history[0]["ratio_dev_before_update"] < 1e-5
