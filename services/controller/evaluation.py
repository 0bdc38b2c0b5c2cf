"""Evaluation as the paper's: `flowgrpo eval`, and the same code every `run.eval_every`
iterations of training (at iteration 0, before any update, and at the end too).

What is evaluated
    The test prompts (prompts.eval, else the training prompts), each distinct prompt
    once in file order, the first `run.eval_prompts` of them (0: all), with
    `run.eval_images_per_prompt` images each. The paper's GenEval file lists each of its
    553 prompts 4 times (2212 lines, one image a line); here the same 2212 images are 553
    prompts x 4, GenEval's own protocol, and OCR and PickScore take 1 image a prompt.
    Every image is a deterministic ODE sample with `sample.eval_steps` steps from its own
    noise, drawn from `image_seed(run.seed, prompt, k)`: the same prompts give the same
    starting noise at every evaluation, with any number of workers, for the base model
    and every checkpoint alike, so rows of a table differ by the weights alone. Weights:
    the EMA LoRA (training, and a checkpoint's for `flowgrpo eval RUN_DIR`), or the base
    model with the LoRA at zero (`--base`, the "before" row of the paper's table).

Where the work runs
    Rollout workers sample whole prompts per call (about `sample.batch_size` images);
    each finished batch goes by object reference to the next reward worker (round robin),
    which scores it with the training scorers and the eval-only ones (`reward.eval`).
    The driver receives the scored rows without images (RewardWorker.score drops them
    in evaluation), and the first GRID_IMAGES images for the grid.

Metrics: `summarize` (a flat JSON object, RUN_DIR/eval/iter_NNNNNN.json)
    geneval/<tag>      GenEval's accuracy of a tag: the mean of `correct` over its images
    geneval/overall    GenEval's summary: the mean of the tags' accuracies (not of the images)
    geneval/strict     the mean of `strict` over all images
    geneval/extra_objects  the mean, over all images, of the objects of the prompt's classes
                       beyond the counts it asks for (GenEval's "at least" rule lets a
                       policy gain by drawing more; geneval_rules)
    ocr/accuracy       the mean OCR reward over the test images (what the paper reports)
    <name>/mean        each scorer's mean score; pickscore's in the unit of the paper's
                       table, logit_scale * cos (the reward x 26)
    images, prompts    scored; groups_failed and images_failed count the prompts whose
                       scoring failed (their images are left out of every mean)
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from common import wire
from common.config import Config, RunConfig
from common.lora import LoraWeights, pack_lora
from common.prompts import GENEVAL_TAGS, PromptRecord, load_prompts, resolve_prompt_path
from services.controller.run_folder import COMPLETE, RunFolder, latest_checkpoint
from services.learner import state as learner_state
from services.reward.pickscore import SCALE as PICKSCORE_SCALE

GRID_IMAGES = 16
CHUNK_RETRIES = 3


# ---------------------------------------------------------------- what is evaluated

def is_due(done: int, run: RunConfig) -> bool:
    """Evaluate after `done` iterations: at 0, every `run.eval_every` and at the end
    (never when eval_every is 0)."""
    return run.eval_every > 0 and (done % run.eval_every == 0 or done == run.iterations)


def eval_records(config: Config) -> list[PromptRecord]:
    """The test prompts: prompts.eval (else the training prompts), each distinct prompt
    (text and metadata) once in file order, the first run.eval_prompts (0: all)."""
    path = config.prompts.eval or config.prompts.train
    seen, records = set(), []
    for record in load_prompts(resolve_prompt_path(path), config.prompts.format):
        key = (record.prompt, json.dumps(record.metadata, sort_keys=True))
        if key not in seen:
            seen.add(key)
            records.append(record)
    limit = config.run.eval_prompts
    return records[:limit] if limit else records


def image_seed(seed: int, prompt: int, image: int) -> int:
    """The noise seed of image `image` of test prompt `prompt`: fixed by the run seed and
    the pair alone (not by iteration, worker or batch)."""
    return int(np.random.SeedSequence([seed, prompt, image]).generate_state(1)[0])


@dataclass
class Chunk:
    """One rollout call: whole test prompts (positions in the test list)."""
    prompts: list[int]
    attempts: int = 0


def plan_chunks(n_prompts: int, per_prompt: int, batch_size: int) -> list[Chunk]:
    step = max(1, batch_size // per_prompt)
    return [Chunk(list(range(i, min(i + step, n_prompts)))) for i in range(0, n_prompts, step)]


# ---------------------------------------------------------------- metrics

def summarize(rows: pa.Table, groups_failed: int, per_prompt: int) -> dict[str, float]:
    """The evaluation's metrics (module docstring) from the scored rows: `rewards` (one
    score per scorer) and `details` (JSON per row: scorer name -> its verdict)."""
    out: dict[str, float] = {"images": float(rows.num_rows),
                             "prompts": float(len(set(rows.column("prompt_index").to_pylist()))),
                             "groups_failed": float(groups_failed), "images_failed": float(groups_failed * per_prompt)}
    rewards = rows.column("rewards").combine_chunks()
    for field in rewards.type:
        values = rewards.field(field.name).to_numpy(zero_copy_only=False)
        out[f"{field.name}/mean"] = float(np.mean(values)) * (PICKSCORE_SCALE if field.name == "pickscore" else 1.0)
    if "ocr/mean" in out:
        out["ocr/accuracy"] = out["ocr/mean"]
    if "geneval/mean" in out:
        out.update(geneval_summary([d["geneval"] for d in wire.details_column(rows)]))
    return out


def geneval_summary(verdicts: Sequence[dict]) -> dict[str, float]:
    """GenEval's summary of per-image verdicts ({tag, correct, strict, ...}): each tag's
    accuracy (the mean of `correct` over its images), `overall` the mean of the tags'
    accuracies (GenEval's summary_scores: tasks weigh equally, whatever their image
    counts), `strict` the mean of `strict` and `extra_objects` the mean of
    `extra_objects` over all images. A tag without images has no key and no part in
    `overall`."""
    by_tag: dict[str, list[bool]] = {}
    for v in verdicts:
        by_tag.setdefault(v["tag"], []).append(bool(v["correct"]))
    unknown = sorted(set(by_tag) - set(GENEVAL_TAGS))
    if unknown:
        raise ValueError(f"GenEval verdicts with unknown tags {unknown}; GenEval's tags are {', '.join(GENEVAL_TAGS)}")
    out = {f"geneval/{tag}": float(np.mean(by_tag[tag])) for tag in GENEVAL_TAGS if tag in by_tag}
    out["geneval/overall"] = float(np.mean(list(out.values())))
    out["geneval/strict"] = float(np.mean([bool(v["strict"]) for v in verdicts]))
    out["geneval/extra_objects"] = float(np.mean([v["extra_objects"] for v in verdicts]))
    return out


# ---------------------------------------------------------------- running it

def evaluate(config: Config, records: Sequence[PromptRecord], rollouts: list, rewards: list, weights,
             folder: RunFolder, iteration: int, dashboard=None) -> dict[str, float]:
    """Evaluate on `records` with the rollout and reward actors given, and write the
    results (RunFolder.write_eval). `weights`: the LoRA (LoraWeights or an object ref of
    them) the rollout workers load first; None evaluates what they hold, which for fresh
    workers is the base model (the Gaussian init leaves LoRA B at zero). Returns the
    metrics, with `time/evaluate`."""
    start = time.perf_counter()
    if weights is not None:
        versions = ray.get([actor.set_weights.remote(weights) for actor in rollouts],
                           timeout=config.rollout.timeout_s)
    else:
        versions = ray.get([actor.policy_version.remote() for actor in rollouts], timeout=config.rollout.timeout_s)
    if len(set(versions)) != 1:
        raise RuntimeError(f"evaluation: the rollout workers hold different LoRA versions {versions}")
    version = versions[0]
    rows, failures, grid = _sample_and_score(config, records, rollouts, rewards, weights)
    bad = sorted(set(rows.column("policy_version").to_pylist()) - {version})
    if bad:
        raise RuntimeError(f"evaluation: images of LoRA version(s) {bad} among version {version}'s "
                           "(a rollout worker restarted with other weights); evaluate again")
    metrics = summarize(rows, len(failures), config.run.eval_images_per_prompt)
    if failures:
        print(f"flowgrpo: evaluation at iteration {iteration}: {len(failures)} prompt(s) failed scoring and are left "
              f"out of the means; first: {failures[0].scorer}: {failures[0].reason}", file=sys.stderr)
    metrics.update({"policy_version": float(version), "eval_steps": float(config.sample.eval_steps),
                    "images_per_prompt": float(config.run.eval_images_per_prompt),
                    "time/evaluate": time.perf_counter() - start})
    folder.write_eval(iteration, metrics, rows, *_grid(rows, *grid))
    if dashboard is not None:
        dashboard.set_eval({k: v for k, v in metrics.items() if "/" in k and not k.startswith("time/")})
    return metrics


def _sample_and_score(config: Config, records: Sequence[PromptRecord], rollouts: list, rewards: list, weights):
    """Dispatch the chunks round robin over the rollout workers, send each finished batch
    by reference to the next reward worker, and gather the scored rows (in prompt order,
    without images), the failed groups, and the first GRID_IMAGES images with their seeds."""
    per_prompt = config.run.eval_images_per_prompt
    seeds = [[image_seed(config.run.seed, i, k) for k in range(per_prompt)] for i in range(len(records))]
    chunks = plan_chunks(len(records), per_prompt, config.sample.batch_size)
    pending, scoring, scored, failures, grid_refs = {}, {}, [], [], []
    turn = {"rollout": 0, "reward": 0}

    def dispatch(chunk: Chunk) -> None:
        actor = rollouts[turn["rollout"] % len(rollouts)]
        turn["rollout"] += 1
        if chunk.attempts and weights is not None:  # a restarted worker holds no LoRA: send it again first
            actor.set_weights.remote(weights)
        ref = actor.evaluate.remote([records[i].prompt for i in chunk.prompts], chunk.prompts,
                                    [records[i].metadata for i in chunk.prompts], [seeds[i] for i in chunk.prompts])
        pending[ref] = chunk

    for chunk in chunks:
        dispatch(chunk)
    timeout = config.rollout.timeout_s + config.reward.timeout_s * (config.reward.retries + 1)
    images_per_chunk = len(chunks[0].prompts) * per_prompt
    grid_chunks = {c.prompts[0] for c in chunks[:-(-GRID_IMAGES // images_per_chunk)]}  # ceil: enough for the grid
    while pending or scoring:
        ready, _ = ray.wait(list(pending) + list(scoring), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError(f"evaluation: no batch finished within {timeout:g} s (rollout.timeout_s + "
                               "reward.timeout_s x (reward.retries + 1)); see the worker logs")
        ref = ready[0]
        if ref in pending:  # sampled: to a reward worker by reference, never through the driver
            chunk = pending.pop(ref)
            worker = rewards[turn["reward"] % len(rewards)]
            turn["reward"] += 1
            scoring[worker.score.remote(ref, evaluation=True)] = (chunk, ref)
            continue
        chunk, batch_ref = scoring.pop(ref)
        try:
            rows, failed = ray.get(ref)
        except (RayActorError, RayTaskError) as err:  # a worker died or failed: sample the chunk again
            chunk.attempts += 1
            if chunk.attempts > CHUNK_RETRIES:
                raise RuntimeError(f"evaluation: a chunk failed {chunk.attempts} times; last error: {err}") from err
            dispatch(chunk)
            continue
        scored.append((chunk.prompts[0], rows))
        failures.extend(failed)
        if chunk.prompts[0] in grid_chunks:
            grid_refs.append((chunk.prompts[0], batch_ref))
    if not sum(batch.num_rows for _, batch in scored):
        raise RuntimeError(f"evaluation: every test prompt failed scoring ({len(failures)} failures, e.g. "
                           f"{failures[:1]}); see the reward worker logs")
    rows = wire.concat([batch for _, batch in sorted(scored, key=lambda item: item[0])])
    grid = [ray.get(ref, timeout=timeout) for _, ref in sorted(grid_refs, key=lambda item: item[0])]
    grid_images = np.concatenate([wire.tensor_column(b, "image") for b in grid])[:GRID_IMAGES]
    grid_keys = [key for b in grid for key in zip(b.column("prompt_index").to_pylist(), b.column("seed").to_pylist())]
    return rows, failures, (grid_images, grid_keys[:GRID_IMAGES])


def _grid(rows: pa.Table, images: np.ndarray, keys: list[tuple[int, int]]):
    """The grid's images (those whose prompt was scored) with their prompts and verdicts:
    GenEval's `correct`, else the weighted reward. Returns (images, prompts, values, label)."""
    position = {key: i for i, key in enumerate(zip(rows.column("prompt_index").to_pylist(),
                                                    rows.column("seed").to_pylist()))}
    keep = [j for j, key in enumerate(keys) if key in position]
    index = [position[keys[j]] for j in keep]
    prompts = [rows.column("prompt")[i].as_py() for i in index]
    if "geneval" in [field.name for field in rows.column("rewards").type]:
        details = wire.details_column(rows)
        return images[keep], prompts, [float(details[i]["geneval"]["correct"]) for i in index], "correct"
    return images[keep], prompts, [rows.column("reward")[i].as_py() for i in index], "reward"


# ---------------------------------------------------------------- flowgrpo eval

def find_checkpoint(run_dir: Path, iteration: int | None) -> Path:
    """RUN_DIR/checkpoints/iter_N: the latest complete one, or that of `iteration`."""
    if iteration is None:
        directory = latest_checkpoint(run_dir)
        if directory is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {Path(run_dir) / 'checkpoints'}; evaluate "
                                    "a run folder that has one, or the base model with --base")
        return directory
    directory = Path(run_dir) / "checkpoints" / f"iter_{iteration:06d}"
    if not (directory / COMPLETE).is_file():
        found = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("iter_*") if (p / COMPLETE).is_file())
        raise FileNotFoundError(f"--checkpoint {iteration}: {run_dir} has no complete checkpoint of that iteration "
                                f"(it has: {', '.join(found) or 'none'})")
    return directory


def checkpoint_state(directory: Path) -> dict:
    """The learner's state dict (Learner.state_dict, unpacked) as SyncTrainer.checkpoint saved it."""
    from services.controller.trainer import LEARNER_META, LEARNER_TENSORS  # the trainer imports this module

    return learner_state.unpack((directory / LEARNER_TENSORS).read_bytes(),
                                json.loads((directory / LEARNER_META).read_text()))


def ema_lora(state: dict, names: Sequence[str]) -> LoraWeights:
    """The LoRA a learner state dict (Learner.state_dict) evaluates with, as the learner
    publishes it (`Learner.weights(ema=True)`): the EMA shadows, which the state keeps in
    the order of the LoRA parameters, named by `names` (that order:
    RolloutWorker.lora_names); the plain LoRA when the run kept no EMA."""
    lora = state["lora"]
    if state.get("ema") is None:
        return pack_lora(lora, state["version"])
    shadow = state["ema"]["shadow"]
    if sorted(names) != sorted(lora) or len(shadow) != len(names):
        raise ValueError(f"learner state: {len(shadow)} EMA tensors and {len(lora)} LoRA weights do not fit the "
                         f"model's {len(names)} LoRA weights: evaluate with the run's own config (lora.*)")
    return pack_lora({name: value.to(lora[name].dtype) for name, value in zip(names, shadow)}, state["version"])


def run_eval(config: Config, run_dir: Path, checkpoint: int | None = None, base: bool = False,
             address: str | None = None) -> dict[str, float]:
    """`flowgrpo eval`: start rollout and reward workers (no learner), evaluate a
    checkpoint's EMA LoRA (the latest, or `checkpoint`) or, with `base`, the base model
    (written as iteration 0, the row before training), and stop them."""
    from services.controller import cluster
    from services.reward.scorers import scorer_needs
    from services.reward.worker import RewardWorker
    from services.rollout.worker import RolloutWorker

    if base:
        iteration, state = 0, None
    else:
        directory = find_checkpoint(run_dir, checkpoint)
        iteration, state = int(directory.name[len("iter_"):]), checkpoint_state(directory)
    records = eval_records(config)
    owns_ray = cluster.connect(address)
    rollouts, rewards, folder = [], [], None
    try:
        cluster.check_resources(dataclasses.replace(  # no learner in an evaluation
            config, learner=dataclasses.replace(config.learner, num_gpus=0.0, num_cpus=0.0)))
        folder = RunFolder(run_dir)
        if not (folder.path / "config.yaml").exists():
            folder.write_config(config)
        needs = [scorer_needs(name, config.reward) for name in config.reward.all_scorers()]
        rewards = [cluster.start_reward_worker(RewardWorker, config, needs) for _ in range(config.reward.num_workers)]
        rollouts = [cluster.start_rollout_worker(RolloutWorker, config, i) for i in range(config.rollout.num_workers)]
        ray.get([w.ready.remote() for w in rewards] + [h.actor.ready.remote() for h in rollouts])
        weights = None if state is None else ema_lora(state, ray.get(rollouts[0].actor.lora_names.remote()))
        print(f"flowgrpo: evaluating {'the base model' if base else f'the EMA LoRA of {directory}'} on "
              f"{len(records)} prompts x {config.run.eval_images_per_prompt} images", file=sys.stderr)
        return evaluate(config, records, [h.actor for h in rollouts], rewards, weights, folder, iteration)
    finally:
        cluster.stop(rollouts)
        for actor in rewards:
            ray.kill(actor, no_restart=True)
        if folder is not None:
            folder.close()
        if owns_ray:
            ray.shutdown()
