"""`flowgrpo plan`: the time per iteration of every placement and split of N devices,
predicted from measured per-role costs, beside the paper's script on the same devices.

Costs (seconds on one device; `Costs`):
    c_r   one rollout call (max(1, batch_size // group_size) whole groups) on one worker
    c_l   one trained sample on one learner rank (all trained steps, forward + backward)
    tail  reward scoring left after the last rollout call, per iteration
    w     weight sync per iteration (publish the LoRA, every worker loads it)
    o     everything else the controller spends per iteration
    a(L)  one all-reduce of the LoRA gradients of L ranks (ring): 0 for L = 1, else
          alpha + 2 (L - 1) / L * lora_bytes / bandwidth

An iteration has n rollout calls of m learner micro-batches each, S trained samples
(zero-advantage groups are not trained) and k = train.optimizer_steps_per_iteration x
train.inner_epochs optimizer steps. Calls are indivisible and call i goes to worker
(and learner rank) i mod R. The learner ranks run in lock step (Learner.train): each
epoch cuts every rank's micro-batches into the optimizer steps (Learner._schedule), and
every rank waits at each step's all-reduce for the rank with the most of that step's
micro-batches. With B(L) the sum over the steps of that busiest rank's count
(`busiest_micro_batches`; B(1) = n m),

    roll(R)  = ceil(n / R) c_r
    learn(L) = B(L) (S / (n m)) c_l + k a(L)

and with G devices for the reward workers (ceil(reward.num_workers x reward.num_gpus)):

    split sync       roll(R) + tail + learn(L) + w + o             R + L = N - G
    split async      max(roll(R) + tail, learn(L)) + w + o         rollout overlaps the update
    colocated sync   roll(M) + tail + learn(M) + w + o             M = N - G, both roles on each
    paper's script   roll(N) + tail + learn(N)                     every device samples, then trains,
                                                                   its ranks balanced: B(N) = ceil(n m / N)

Colocated async is not listed: both roles would share each device's compute, so it is
no faster than colocated sync in this model. Costs come from a run's metrics.jsonl
(c_r = time/rollout_compute / ceil(n / R0), c_l = learn_seconds / (B(L0) S / (n m)),
tail = time/reward_tail, w = time/weight_sync, o = time/iteration less all of those;
means over the iterations after the first, which warms up, and without evaluation),
from `flowgrpo gpu-check`'s JSON (c_r, c_l, w; tail and o are 0 there: no reward, no
Ray), or given per image.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.config import Config, ConfigError, load_config

# All-reduce defaults: NCCL within one node, and gloo over loopback on the CPU.
GPU_ALLREDUCE = (1e-4, 50e9)   # (alpha seconds, bandwidth bytes/s)
CPU_ALLREDUCE = (1e-3, 1e9)
SD35_MEDIUM_LORA_BYTES = 75.1e6  # rank-32 LoRA on the attention projections: 18.78 M float32 gradients


@dataclass(frozen=True)
class Costs:
    call_seconds: float      # c_r
    sample_seconds: float    # c_l
    calls: int               # n
    trained: float           # S
    optimizer_steps: int     # k (all epochs)
    micro_batches: int       # m, per call
    epochs: int              # train.inner_epochs
    reward_devices: int      # G
    lora_bytes: float
    allreduce: tuple[float, float]  # (alpha, bandwidth)
    tail: float = 0.0
    sync: float = 0.0
    overhead: float = 0.0
    source: str = ""


@dataclass(frozen=True)
class Layout:
    placement: str   # split, colocated, paper
    mode: str        # sync, async
    rollout: int     # R
    learners: int    # L

    def __str__(self) -> str:
        return f"{self.placement} {self.mode} R={self.rollout} L={self.learners}"


def allreduce_seconds(costs: Costs, ranks: int) -> float:
    alpha, bandwidth = costs.allreduce
    return 0.0 if ranks <= 1 else alpha + 2 * (ranks - 1) / ranks * costs.lora_bytes / bandwidth


def rollout_seconds(costs: Costs, workers: int) -> float:
    return math.ceil(costs.calls / workers) * costs.call_seconds


def busiest_micro_batches(costs: Costs, ranks: int) -> float:
    """B(L): the sum over optimizer steps of the busiest rank's micro-batches under
    Learner._schedule, which cuts each rank's micro-batches into the steps: with m_r
    micro-batches on rank r and s steps an epoch, step k holds ceil or floor(m_r / s) of
    them, and B(L) = epochs x sum over k of max over r of that."""
    per_rank = np.bincount(np.arange(costs.calls) % ranks, minlength=ranks) * costs.micro_batches
    steps = costs.optimizer_steps // costs.epochs
    per_epoch = sum(max(len(part) for part in (np.array_split(np.arange(m), steps)[k] for m in per_rank))
                    for k in range(steps))
    return float(per_epoch * costs.epochs)


def learn_seconds(costs: Costs, ranks: int, balanced: bool = False) -> float:
    """learn(L); `balanced`: every rank trains the same number of micro-batches in every
    step (the paper's script: each GPU trains the samples it drew), ceil(n m / L) each."""
    per_micro_batch = costs.trained / (costs.calls * costs.micro_batches) * costs.sample_seconds
    busiest = (math.ceil(costs.calls * costs.micro_batches / ranks) if balanced
               else busiest_micro_batches(costs, ranks))
    return busiest * per_micro_batch + costs.optimizer_steps * allreduce_seconds(costs, ranks)


def predict(costs: Costs, layout: Layout) -> float:
    """Seconds per iteration (module docstring)."""
    roll, learn = rollout_seconds(costs, layout.rollout), learn_seconds(costs, layout.learners)
    if layout.placement == "paper":
        return roll + costs.tail + learn_seconds(costs, layout.learners, balanced=True)
    if layout.mode == "async" and layout.placement == "split":
        return max(roll + costs.tail, learn) + costs.sync + costs.overhead
    return roll + costs.tail + learn + costs.sync + costs.overhead


def layouts(costs: Costs, devices: int) -> list[Layout]:
    """Every split of the devices left after the reward workers, colocated on all of
    them, and the paper's script on all N."""
    usable = devices - costs.reward_devices
    if usable < 1:
        raise ConfigError(f"--gpus: {devices} device(s) leave none beside the {costs.reward_devices} of the reward "
                          f"workers (reward.num_workers x reward.num_gpus); give more")
    out = [Layout("split", mode, r, usable - r) for mode in ("sync", "async") for r in range(1, usable)]
    return out + [Layout("colocated", "sync", usable, usable), Layout("paper", "sync", devices, devices)]


def plan(costs: Costs, devices: int) -> list[tuple[Layout, float]]:
    """Every layout with its predicted seconds per iteration, fastest first."""
    return sorted(((layout, predict(costs, layout)) for layout in layouts(costs, devices)), key=lambda x: x[1])


def recommend(ranked: list[tuple[Layout, float]]) -> tuple[Layout, float]:
    """The fastest layout this system can run (the paper's script is the yardstick)."""
    return next((layout, seconds) for layout, seconds in ranked if layout.placement != "paper")


# ------------------------------------------------------------------ costs from measurements


def iteration_shape(config: Config) -> tuple[int, int, int]:
    """(rollout calls n, images, optimizer steps k) of one iteration, as the trainer cuts
    it: whole groups per call, about sample.batch_size images, at least one group."""
    s, t = config.sample, config.train
    per_call = max(1, s.batch_size // s.group_size)
    calls = math.ceil(s.prompts_per_iteration / per_call)
    return calls, s.prompts_per_iteration * s.group_size, t.optimizer_steps_per_iteration * t.inner_epochs


def images_per_call(config: Config) -> int:
    calls, images, _ = iteration_shape(config)
    return math.ceil(images / calls)


def micro_batches_per_call(config: Config) -> int:
    """The learner's micro-batches of one call: its denoising batches (sample.batch_size
    images) each cut to train.micro_batch_size (Learner._micro_batches)."""
    images, batch = images_per_call(config), config.sample.batch_size
    return math.ceil(images / batch) * math.ceil(min(batch, images) / config.train.micro_batch_size)


def _common(config: Config, lora_bytes: float | None) -> dict:
    calls, images, steps = iteration_shape(config)
    on_gpu = config.learner.num_gpus > 0
    return dict(calls=calls, trained=float(images), optimizer_steps=steps, micro_batches=micro_batches_per_call(config),
                epochs=config.train.inner_epochs,
                reward_devices=math.ceil(config.reward.num_workers * config.reward.num_gpus - 1e-9),
                lora_bytes=SD35_MEDIUM_LORA_BYTES if lora_bytes is None else lora_bytes,
                allreduce=GPU_ALLREDUCE if on_gpu else CPU_ALLREDUCE)


def run_layout(config: Config) -> Layout:
    return Layout(config.placement, config.run.mode, config.rollout.num_workers, config.learner.num_workers)


def read_metrics(run_dir: Path) -> list[dict]:
    """The iterations of a run that measure steady state: after the first, without evaluation."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--run {run_dir}: no metrics.jsonl there; give a run folder of flowgrpo train "
                          "with at least two iterations")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows[1:] if not r.get("time/evaluate")]
    if not rows:
        raise ConfigError(f"--run {run_dir}: fewer than two iterations without evaluation in metrics.jsonl; "
                          "train longer (the first iteration warms up and is left out)")
    return rows


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else 0.0


def costs_from_run(run_dir: Path) -> tuple[Costs, Config]:
    """Per-role costs measured in a run folder (module docstring), with its config."""
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: not a run folder (no config.yaml of flowgrpo train); give one")
    config = load_config(Path(run_dir) / "config.yaml", [])
    rows = read_metrics(run_dir)
    layout = run_layout(config)
    base = _common(config, _lora_bytes(run_dir))
    base["trained"] = _mean(rows, "samples_trained") or base["trained"]
    draft = Costs(call_seconds=0.0, sample_seconds=0.0, **base)
    rollout, learn = _mean(rows, "time/rollout_compute"), _mean(rows, "learn_seconds")
    compute = max(learn - draft.optimizer_steps * allreduce_seconds(draft, layout.learners), 0.0)
    tail, sync = _mean(rows, "time/reward_tail"), _mean(rows, "time/weight_sync")
    overhead = _mean(rows, "time/iteration") - (rollout + tail + learn + sync)
    return replace(draft, call_seconds=rollout / math.ceil(draft.calls / layout.rollout),
                   sample_seconds=compute / (busiest_micro_batches(draft, layout.learners) * draft.trained
                                             / (draft.calls * draft.micro_batches)),
                   tail=tail, sync=sync, overhead=max(overhead, 0.0),
                   source=f"measured in {run_dir} ({layout}, {len(rows)} iterations)"), config


def _lora_bytes(run_dir: Path) -> float | None:
    files = list((Path(run_dir) / "lora").glob("*.safetensors"))
    return float(files[0].stat().st_size) if files else None


def costs_from_gpu_check(path: Path, config: Config) -> Costs:
    """Costs of one GPU from `flowgrpo gpu-check --json`: the learner figure of the
    config's KL (train.beta) and gradient checkpointing; every image trained."""
    figures = json.loads(Path(path).read_text())
    key = f"learner{'_kl' if config.train.beta > 0 else ''}" \
          f"{'_checkpointing' if config.learner.gradient_checkpointing else ''}_samples_per_second"
    if figures.get(key) is None:
        raise ConfigError(f"--from-gpu-check {path}: the check ran out of memory for this config's learner "
                          f"({key}); run it again with a smaller train.micro_batch_size or with "
                          "learner.gradient_checkpointing=true, and plan with the same --set")
    base = _common(config, figures["lora_megabytes"] * 1e6)
    sync = figures["lora_serialize_seconds"] + figures["lora_load_seconds"] / figures["lora_copies"]
    return Costs(call_seconds=images_per_call(config) / figures["rollout_images_per_second"],
                 sample_seconds=1.0 / figures[key], sync=sync,
                 source=f"gpu-check {path} ({figures['size']}, {figures['device']}, {figures['precision']})", **base)


def costs_per_image(rollout: float, learn: float, config: Config, source: str) -> Costs:
    """Costs given per image: `rollout` seconds to sample one image, `learn` to train one."""
    return Costs(call_seconds=images_per_call(config) * rollout, sample_seconds=learn, source=source,
                 **_common(config, None))


def report(costs: Costs, devices: int, config: Config) -> str:
    """The table of every layout and the recommendation, as text."""
    ranked = plan(costs, devices)
    paper = next(seconds for layout, seconds in ranked if layout.placement == "paper")
    calls, images, _ = iteration_shape(config)
    lines = [f"costs: {costs.source}",
             f"  rollout call ({images_per_call(config)} images) {costs.call_seconds:.4g} s, trained sample "
             f"{costs.sample_seconds:.4g} s, reward tail {costs.tail:.3g} s, weight sync {costs.sync:.3g} s, "
             f"overhead {costs.overhead:.3g} s, all-reduce of {costs.lora_bytes / 1e6:.3g} MB "
             f"(alpha {costs.allreduce[0]:g} s, {costs.allreduce[1] / 1e9:g} GB/s)",
             f"iteration: {images} images in {calls} rollout calls of {costs.micro_batches} micro-batches, "
             f"{costs.trained:.0f} trained, "
             f"{costs.optimizer_steps} optimizer steps; {devices} devices, {costs.reward_devices} for reward workers",
             f"{'placement':<10} {'mode':<6} {'rollout':>7} {'learner':>7} {'s/iteration':>12} {'vs paper':>9}"]
    for layout, seconds in ranked:
        lines.append(f"{layout.placement:<10} {layout.mode:<6} {layout.rollout:>7} {layout.learners:>7} "
                     f"{seconds:>12.4g} {paper / seconds:>8.2f}x")
    best, seconds = recommend(ranked)
    lines.append(f"recommended: placement: {best.placement}, run.mode: {best.mode}, rollout.num_workers: "
                 f"{best.rollout}, learner.num_workers: {best.learners}: {seconds:.4g} s an iteration, "
                 f"{paper / seconds:.2f}x the paper's script on the same {devices} devices ({paper:.4g} s)")
    return "\n".join(lines)


def compare(costs: Costs, run_dirs: list[Path]) -> tuple[str, list[float]]:
    """Each measured run's mean time/iteration beside the prediction for its layout
    from `costs` (the runs differ in layout only); returns the text and the relative
    errors (predicted / measured - 1)."""
    lines, errors = [f"{'run':<40} {'layout':<28} {'measured':>9} {'predicted':>9} {'error':>7}"], []
    for run_dir in run_dirs:
        config = load_config(Path(run_dir) / "config.yaml", [])
        measured = _mean(read_metrics(run_dir), "time/iteration")
        layout = run_layout(config)
        predicted = predict(costs, layout)
        errors.append(predicted / measured - 1)
        lines.append(f"{str(run_dir):<40} {str(layout):<28} {measured:>9.3f} {predicted:>9.3f} {errors[-1]:>+7.1%}")
    return "\n".join(lines), errors
