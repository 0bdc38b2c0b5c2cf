"""One Flow-GRPO iteration in one process, without Ray: rollout a group per prompt with
the tiny model, score brightness, compute advantages, update, sync the LoRA."""
import numpy as np
import pytest
import torch

from common import wire
from common.lora import lora_state_dict
from common.prompts import PromptRecord, PromptStream
from services.controller.iteration import run_local_iteration
from services.learner.learner import Learner
from services.reward.worker import RewardWorker
from services.rollout.worker import RolloutWorker

PROMPTS = [PromptRecord("a red cat"), PromptRecord("a blue dog"), PromptRecord("a green car")]


@pytest.fixture(scope="module")
def workers(tiny_config):
    config = tiny_config("train.beta=0.04", "train.ema=true", "train.ema_every=1", "train.learning_rate=1e-2")
    learner = Learner(config)
    with torch.no_grad():  # Gaussian init leaves LoRA B at zero; start from a non-trivial adapter
        for p in learner.params:
            p.add_(0.02 * torch.randn_like(p))
    rollout = RolloutWorker(config)
    rollout.set_weights(learner.weights())
    return config, rollout, RewardWorker(config.reward), learner


def test_one_iteration_end_to_end(workers):
    config, rollout, reward, learner = workers
    before = {k: v.clone() for k, v in lora_state_dict(learner.transformer).items()}
    draws = PromptStream(PROMPTS, seed=0).next_batch(2)
    data, metrics = run_local_iteration(rollout, reward, learner, draws, seed=1, train=config.train)

    g = config.sample.group_size
    assert data.num_rows == 2 * g
    assert "latents" not in data.column_names  # scoring passes them by; the learner reads the rollout batch
    assert wire.list_column(data, "log_probs").shape == (2 * g, config.sample.train_steps)
    # on-policy: before the first update the learner recomputes exactly the rollout's log-probs
    assert metrics["ratio_dev_before_update"] < 1e-5
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["kl"]) and np.isfinite(metrics["grad_norm"])
    assert metrics["samples_trained"] == 2 * g
    after = lora_state_dict(learner.transformer)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the LoRA did not change"
    # the exported LoRA round-trips: the rollout worker now holds exactly the learner's weights
    assert rollout.version == learner.version == 1
    held = lora_state_dict(rollout.pipe.transformer)
    assert all(torch.equal(held[k], after[k]) for k in after)


def test_rollout_is_deterministic_for_a_seed(workers):
    config, rollout, _, _ = workers
    a = rollout.generate(["a red cat"], [0], [{}], seed=5)
    b = rollout.generate(["a red cat"], [0], [{}], seed=5)
    c = rollout.generate(["a red cat"], [0], [{}], seed=6)
    assert wire.tensor_column(a, "latents").shape == (config.sample.group_size, config.sample.train_steps + 1, 16, 4, 4)
    assert np.array_equal(wire.tensor_column(a, "latents"), wire.tensor_column(b, "latents"))
    assert not np.array_equal(wire.tensor_column(a, "latents"), wire.tensor_column(c, "latents"))
    assert wire.tensor_column(a, "image").dtype == np.uint8


def test_eval_uses_the_ode_with_more_steps(workers):
    config, rollout, _, _ = workers
    args = (["a red cat", "a blue dog"], [0, 1], [{}, {}], [[5], [6]])
    images = wire.tensor_column(rollout.evaluate(*args), "image")
    assert images.shape == (2, config.sample.resolution, config.sample.resolution, 3)
    assert np.array_equal(images, wire.tensor_column(rollout.evaluate(*args), "image"))
    assert len(rollout.eval_schedule[0]) == config.sample.eval_steps > config.sample.train_steps
