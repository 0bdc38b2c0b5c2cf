"""Contrastive pretraining of the toy CLIP encoders: the negatives it learns from are false
of the scenes by GenEval's own rules, and a short training separates the prompts."""
import numpy as np
import torch

from common.toy_clip import confusers, train_clip_encoder, truth_key
from common.toy_pretrain import build_toy_pipeline
from common.toy_world import all_prompts, render, sample_scene
from services.reward.geneval_rules import evaluate
from services.reward.toy_detector import ToyDetector


def test_a_scene_satisfies_exactly_the_prompts_of_its_tag_with_its_truth_key():
    """The premise of the loss: within a tag, a scene of prompt i is true for prompt j
    exactly when truth_key(j) == truth_key(i) (mirrored relations, clauses in another
    order), so every confuser is a true negative."""
    prompts = all_prompts()
    candidates = confusers(prompts)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(p, rng) for p in prompts]
    detections = ToyDetector().detect([render(s, 64) for s in scenes])
    mirrored = 0
    for i, (p, found) in enumerate(zip(prompts, detections)):
        for j, q in enumerate(prompts):
            if q["tag"] != p["tag"]:
                assert not candidates[i, j]
                continue
            same = truth_key(q) == truth_key(p)
            assert evaluate(q, found).correct == same, (p["prompt"], q["prompt"])
            assert candidates[i, j] == (i == j or not same)
            mirrored += same and i != j
    assert mirrored > 0   # "a dot left of a pole" and "a pole right of a dot" share a key


def test_training_separates_the_prompts_of_a_tag():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pipe = build_toy_pipeline(0)
    before = pipe.text_encoder.text_model.embeddings.token_embedding.weight.clone()
    accuracy = train_clip_encoder(pipe.text_encoder, pipe.tokenizer, seed=0, steps=600, batch_size=64, eval_scenes=256)
    assert set(accuracy) == {p["tag"] for p in all_prompts()}
    # chance is one in the tag's candidates: 1/4 for single objects, 1/12 for two objects
    assert accuracy["single_object"] > 0.9 and accuracy["two_object"] > 0.5, accuracy
    assert not torch.equal(before, pipe.text_encoder.text_model.embeddings.token_embedding.weight)
    assert not pipe.text_encoder.training
