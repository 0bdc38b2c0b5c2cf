"""Learning a compositional reward on the CPU: through the whole actor-learner system,
Flow-GRPO raises the shipped toy model's GenEval accuracy on colour prompts
(common/toy_world.py, deploy/configs/toy_geneval.yaml).

The two colour prompts of the training split that the base model draws worst (yellow:
0.39 and 0.44 of their images right in the first 30 iterations of the shipped config's
run; the other colour prompts 0.76-0.95), each in every iteration (32 images each, so the
batch accuracy moves with the policy, not with which prompts were drawn), GenEval's 0/1
accuracy as the reward, SDE noise on the first two of the 10 steps, learning rate 3e-3,
12 iterations (about 3 s each). Measured (this test, `pytest -s` prints it): the mean
batch accuracy of the last 4 iterations minus that of the first 4 was +0.46 and +0.45
(0.44 -> 0.90 and 0.46 -> 0.91; seeds 0 and 1). A batch's accuracy (64 images) has a
standard deviation of about 0.06, so a difference of two means of 4 about 0.04. The test
asks each seed for +0.2 and their mean for +0.25.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from common.toy_world import split_prompts
from services.controller.job import train
from services.controller.preflight import prepare

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ("a photo of a yellow block", "a photo of a yellow pole")
ITERATIONS = 12
WINDOW = 4
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def colour_prompts(tmp_path_factory):
    train, _ = split_prompts()  # the shipped training file's prompts (tests/unit/test_toy_world.py), each once
    chosen = [r for r in train if r["prompt"] in PROMPTS]
    assert len(chosen) == len(PROMPTS)
    path = tmp_path_factory.mktemp("toy-prompts") / "yellow.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path


def test_toy_geneval_accuracy_rises(ray_cluster, colour_prompts, tmp_path):
    from common.config import load_config

    gains = []
    for seed in SEEDS:
        config = prepare(load_config(REPO / "deploy" / "configs" / "toy_geneval.yaml", [
            f"prompts.train={colour_prompts}",
            "sample.prompts_per_iteration=2", "sample.group_size=32", "sample.batch_size=16",
            "train.micro_batch_size=16", "train.learning_rate=3e-3",
            f"run.iterations={ITERATIONS}", "run.eval_every=0", "run.checkpoint_every=0",
            "run.sample_images_every=0", f"run.seed={seed}",
        ]))
        history = train(config, tmp_path / f"run-{seed}")
        accuracy = np.array([h["reward_mean"] for h in history])
        gains.append(accuracy[-WINDOW:].mean() - accuracy[:WINDOW].mean())
        print(f"seed {seed}: toy-GenEval batch accuracy {accuracy[:WINDOW].mean():.2f} -> "
              f"{accuracy[-WINDOW:].mean():.2f} in {ITERATIONS} iterations ({np.round(accuracy, 2).tolist()})")
    assert min(gains) > 0.2 and np.mean(gains) > 0.25, gains
