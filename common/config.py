"""Typed run configuration that mirrors the YAML file one to one.

Every section of the YAML is a dataclass below and every key a field, so
`train.learning_rate` in YAML is `config.train.learning_rate` in code. Loading
checks unknown keys, types and cross-field consistency, and raises
`ConfigError` naming the dotted path of the field and the fix, before any
worker starts. Defaults are the paper's SD3.5 settings (Flow-GRPO, DESIGN.md §1.10).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


ATTENTION_PROJECTIONS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]


@dataclass
class ModelConfig:
    """The base pipeline. `path` is a local directory or a hub id (e.g.
    stabilityai/stable-diffusion-3.5-medium). `tiny_preset` builds the offline tiny
    model at `path` when the directory does not exist (CPU runs and tests).

    `precision` (common.models.Precision): `fp16-mixed` is the paper's (accelerate's
    mixed precision: float32 transformer weights run under float16 autocast, text
    encoders in float16; its FAQ prefers fp16 to bf16 for log-prob consistency);
    `bf16` keeps the transformer and text encoders in bfloat16 (half the memory);
    `fp32` runs everything in float32; `auto` is fp16-mixed on a GPU, fp32 on the CPU.
    The VAE always decodes in float32 and the SDE math always runs in float32."""
    path: str = "stabilityai/stable-diffusion-3.5-medium"
    precision: Literal["auto", "fp16-mixed", "bf16", "fp32"] = "auto"
    device: str = "auto"
    max_sequence_length: int = 128
    tiny_preset: Optional[Literal["s", "m"]] = None


@dataclass
class SampleConfig:
    """Rollout sampling: `group_size` images per prompt with `train_steps` SDE steps;
    evaluation runs the ODE with `eval_steps` ("denoising reduction")."""
    resolution: int = 512
    train_steps: int = 10
    eval_steps: int = 40
    guidance_scale: float = 4.5
    noise_level: float = 0.7
    group_size: int = 24
    prompts_per_iteration: int = 48
    batch_size: int = 8
    negative_prompt: str = ""
    same_latent: bool = False  # upstream's option: every image of a group starts from the same noise
    # Flow-GRPO-Fast (upstream's train_sd3_fast.py): with sde_window_size w > 0, only w
    # consecutive steps, starting at a step drawn per iteration from
    # [sde_window_range[0], sde_window_range[1] - w], are SDE steps with log-probs, the
    # rest ODE steps, and the learner trains only those w steps. 0: the paper's (SDE at
    # every step, train the first floor(train.timestep_fraction x train_steps)).
    sde_window_size: int = 0
    sde_window_range: list[int] = field(default_factory=lambda: [0, 9])


@dataclass
class TrainConfig:
    """The GRPO update (DESIGN.md §1.5, §1.7): clipped ratio, KL to the LoRA-disabled reference.

    `cfg_gradient`: `joint` (the paper's) recomputes the guided velocity
    v = v_u + s (v_c - v_u) with the rollout's very forward, one batch of 2B
    [uncond; cond], and backpropagates through both branches; `detached` runs the
    unconditional branch under no_grad (a backward over B samples instead of 2B,
    cheaper, but a different gradient and a different forward than the rollout's).
    EMA (`ema_decay`, `ema_every`): at optimizer step s (from 0), when
    (s + 1) % ema_every == 0, ema <- d ema + (1 - d) w with d = min((1 + s) / (10 + s), ema_decay)."""
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.04
    max_grad_norm: float = 1.0
    timestep_fraction: float = 0.99
    optimizer_steps_per_iteration: int = 2
    inner_epochs: int = 1
    micro_batch_size: int = 8
    global_std: bool = True
    ema: bool = True
    ema_decay: float = 0.9
    ema_every: int = 8
    cfg_gradient: Literal["joint", "detached"] = "joint"
    importance_weight_cap: float = 5.0  # async: the decoupled objective's cap on proximal / behaviour


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    init: Literal["gaussian", "kaiming"] = "gaussian"


@dataclass
class OcrConfig:
    """OCR reward engine (services/reward/ocr.py): `rapidocr` (PP-OCR ONNX models inside
    its wheel, onnxruntime; offline), `paddleocr` (the paper's engine; its PP-OCRv4
    models from PaddleOCR's cache, or exported ones from `det_model_dir` and
    `rec_model_dir`, given together) or `tesseract` (psm 7). `use_gpu` runs rapidocr on
    onnxruntime-gpu or PaddleOCR on paddlepaddle-gpu. `min_confidence`: text boxes (words
    for tesseract) read with a lower confidence are dropped before the text is joined,
    with every engine; 0.5 is PaddleOCR 2.x's drop_score, which the paper trained with."""
    engine: Literal["rapidocr", "paddleocr", "tesseract"] = "rapidocr"
    det_model_dir: Optional[str] = None
    rec_model_dir: Optional[str] = None
    use_gpu: bool = False
    min_confidence: float = 0.5


@dataclass
class GenevalConfig:
    """GenEval with a transformers detector: a Mask2Former COCO instance model and CLIP
    for colours, each a hub id or a local path. `reward` is the number trained on:
    `score` (partial credit, the paper's), `strict` or `correct` (the benchmark's 0/1).
    `failed_relation` is how `score` counts a wrong relative position: `paper` as the
    paper's reward server (a 0 and then a 1: 0.75 for a two-object position prompt whose
    objects are found but wrongly placed) or `once` (a single 0: 2/3 there).
    `detector: toy` scores the toy world's images (services/reward/toy_detector.py, no
    model; `clip` and `device` unused)."""
    detector: str = "facebook/mask2former-swin-small-coco-instance"
    clip: str = "openai/clip-vit-large-patch14"
    device: str = "auto"
    reward: Literal["score", "strict", "correct"] = "score"
    failed_relation: Literal["paper", "once"] = "paper"


@dataclass
class PickScoreConfig:
    """PickScore: CLIP-H processor and the PickScore_v1 CLIPModel (hub ids or local paths)."""
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    model: str = "yuvalkirstain/PickScore_v1"
    device: str = "auto"


@dataclass
class AestheticConfig:
    """The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor, as
    the paper's flow_grpo/aesthetic_scorer.py): the L2-normalised image embedding of the
    CLIP ViT-L/14 `clip` (hub id or local path) into an MLP head whose weights are the
    file `head` (a torch state dict: sac+logos+ava1-l14-linearMSE.pth, shipped in the
    paper's repo under flow_grpo/assets/)."""
    clip: str = "openai/clip-vit-large-patch14"
    head: Optional[str] = None
    device: str = "auto"


@dataclass
class RewardConfig:
    """`weights` picks the scorers and their weights in the total. `endpoints` maps a
    scorer name to a remote gRPC service (`grpc://host:port`, started with
    `flowgrpo serve-reward`) that is used in place of the in-process scorer. Each
    scorer call covers `batch_size` images, must answer within `timeout_s` and is
    retried `retries` times before its groups are dropped. With `isolated_env`, the
    reward workers get their own Ray runtime_env holding the scorers' extra packages
    (e.g. the OCR engine) instead of relying on the cluster's image. `eval` names
    scorers that run only when evaluating (to watch for reward hacking: a quality
    score that falls while the reward rises); their scores are logged beside the
    training scorers' and never enter the weighted total."""
    SCORER_NAMES: ClassVar[tuple[str, ...]] = (
        "ocr", "geneval", "pickscore", "aesthetic", "jpeg_compressibility", "brightness")

    weights: dict[str, float] = field(default_factory=lambda: {"geneval": 1.0})
    eval: list[str] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)
    num_workers: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 16
    timeout_s: float = 120.0
    retries: int = 2
    isolated_env: bool = False
    ocr: OcrConfig = field(default_factory=OcrConfig)
    geneval: GenevalConfig = field(default_factory=GenevalConfig)
    pickscore: PickScoreConfig = field(default_factory=PickScoreConfig)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)

    def all_scorers(self) -> list[str]:
        """Every scorer a reward worker loads: the training ones, then the evaluation-only ones."""
        return list(self.weights) + [name for name in self.eval if name not in self.weights]


@dataclass
class PromptsConfig:
    """Training and evaluation prompt sets; `format` is how a line is read."""
    train: str = "geneval/train_metadata.jsonl"
    eval: Optional[str] = None
    format: Literal["text", "ocr", "geneval"] = "geneval"


@dataclass
class RolloutConfig:
    """Rollout workers: each is one Ray actor in its own one-bundle placement group.
    Each caches the text embeddings of its `prompt_cache_size` most recent prompts.
    `resources`: custom Ray resources each worker asks for besides its CPUs and GPUs,
    e.g. {rollout_node: 1} to keep rollout workers on the nodes (or autoscaler node type)
    that advertise `rollout_node`."""
    num_workers: int = 1
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    timeout_s: float = 600.0
    prompt_cache_size: int = 128
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class LearnerConfig:
    """The learner: `num_workers` data-parallel ranks (torch.distributed: NCCL on GPUs,
    gloo on the CPU) in one placement group; one all-reduce of the LoRA gradients per
    optimizer step makes N ranks take the update one learner would take on the whole
    batch. `gradient_checkpointing` recomputes the transformer's activations in the
    backward pass (less memory at SD3.5 scale, about a third more compute).
    `num_torch_threads`: each rank's torch threads, unset: `run.num_torch_threads`; on a
    CPU in sync mode, where rollouts and the update take turns, the update can use every
    core the rollout workers use one each."""
    num_workers: int = 1
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    timeout_s: float = 1800.0
    gradient_checkpointing: bool = False
    num_torch_threads: int | None = None


@dataclass
class RunConfig:
    """The run. Evaluation (services/controller/evaluation.py) runs at iteration 0, every
    `eval_every` iterations and at the end (0: never), on the first `eval_prompts`
    distinct test prompts (0: all of them) with `eval_images_per_prompt` images each.
    `num_torch_threads`: the torch threads of each rollout worker and learner rank (0:
    torch's default; `learner.num_torch_threads` sets the learner's apart)."""
    name: str = "flowgrpo"
    iterations: int = 1000
    seed: int = 42
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1  # async: a sample of version v enters the update at version u only if u - v <= this
    checkpoint_every: int = 50
    sample_images_every: int = 10
    eval_every: int = 0
    eval_prompts: int = 0
    eval_images_per_prompt: int = 1
    num_torch_threads: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # `split`: each role on its own GPUs (rollout workers, learner ranks, reward workers);
    # `colocated`: every GPU hosts one rollout worker and one learner rank, each with its
    # fraction of the GPU (rollout.num_gpus + learner.num_gpus <= 1); in sync mode the
    # phases alternate, so every GPU samples and then trains, as the paper's script.
    placement: Literal["split", "colocated"] = "split"

    def validate(self) -> "Config":
        """Cross-field checks; each failure names the field and the fix."""
        s, t, lora = self.sample, self.train, self.lora
        _check(s.group_size >= 2, "sample.group_size", f"must be at least 2 (GRPO compares images within a group), got {s.group_size}")
        _check(0.0 <= s.noise_level <= 1.0, "sample.noise_level", f"must lie in [0, 1], got {s.noise_level}")
        _check(s.train_steps >= 2, "sample.train_steps", f"must be at least 2, got {s.train_steps}")
        _check(s.eval_steps >= 1, "sample.eval_steps", f"must be at least 1, got {s.eval_steps}")
        _check(s.resolution % 16 == 0 and s.resolution > 0, "sample.resolution", f"must be a positive multiple of 16 (VAE factor 8 x patch 2), got {s.resolution}")
        _check(s.prompts_per_iteration >= 1, "sample.prompts_per_iteration", "must be at least 1")
        if s.sde_window_size:
            low, high = (s.sde_window_range + [None, None])[:2]
            _check(len(s.sde_window_range) == 2 and 0 <= low < high <= s.train_steps - 1, "sample.sde_window_range",
                   f"must be [first, end) steps with 0 <= first < end <= sample.train_steps - 1 = {s.train_steps - 1} "
                   f"(the last step, into sigma 0, is never trained), got {s.sde_window_range}")
            _check(1 <= s.sde_window_size <= high - low, "sample.sde_window_size",
                   f"must fit sample.sde_window_range {s.sde_window_range}, got {s.sde_window_size}")
        _check(s.batch_size >= 1, "sample.batch_size", "must be at least 1")
        _check(s.batch_size % s.group_size == 0 or s.group_size % s.batch_size == 0, "sample.batch_size",
               f"must divide sample.group_size ({s.group_size}) or be a multiple of it, got {s.batch_size}")
        _check(0.0 < t.timestep_fraction <= 1.0, "train.timestep_fraction", f"must lie in (0, 1], got {t.timestep_fraction}")
        _check(int(t.timestep_fraction * s.train_steps) >= 1, "train.timestep_fraction",
               f"trains no step: floor({t.timestep_fraction} x sample.train_steps={s.train_steps}) is 0")
        _check(t.learning_rate > 0, "train.learning_rate", "must be positive")
        _check(t.clip_range > 0, "train.clip_range", "must be positive")
        _check(t.beta >= 0, "train.beta", "must be >= 0 (0 switches the KL term off)")
        _check(t.adv_clip_max > 0, "train.adv_clip_max", "must be positive")
        _check(t.max_grad_norm > 0, "train.max_grad_norm", "must be positive")
        _check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1")
        _check(t.optimizer_steps_per_iteration >= 1, "train.optimizer_steps_per_iteration", "must be at least 1")
        _check(t.inner_epochs >= 1, "train.inner_epochs", "must be at least 1")
        _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must lie in [0, 1), got {t.ema_decay}")
        _check(t.ema_every >= 1, "train.ema_every", "must be at least 1")
        _check(t.importance_weight_cap >= 1, "train.importance_weight_cap", f"must be at least 1, got {t.importance_weight_cap}")
        images = s.group_size * s.prompts_per_iteration
        _check(images >= t.optimizer_steps_per_iteration, "train.optimizer_steps_per_iteration",
               f"exceeds the images per iteration ({images} = sample.group_size x sample.prompts_per_iteration)")
        _check(lora.rank >= 1, "lora.rank", "must be at least 1")
        _check(lora.alpha > 0, "lora.alpha", "must be positive")
        _check(len(lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
        rw = self.reward
        _check(len(rw.weights) > 0, "reward.weights", "must name at least one scorer, e.g. {jpeg_compressibility: 1.0}")
        for name, w in rw.weights.items():
            check_scorer_name(name, f"reward.weights.{name}")
            _check(w == w and abs(w) != float("inf"), f"reward.weights.{name}", "must be a finite number")
        for i, name in enumerate(rw.eval):
            check_scorer_name(name, f"reward.eval[{i}]")
            _check(name not in rw.weights and name not in rw.eval[:i], f"reward.eval[{i}]",
                   f"{name} is already {'in reward.weights' if name in rw.weights else 'listed'}; name it once")
        for scorer, fmt in (("ocr", "ocr"), ("geneval", "geneval")):
            _check(scorer not in rw.all_scorers() or self.prompts.format == fmt, "prompts.format",
                   f"the {scorer} reward reads its targets from {fmt}-format prompts; set prompts.format: {fmt} "
                   f"(got {self.prompts.format})")
        for name, address in rw.endpoints.items():
            _check(address.startswith("grpc://") and ":" in address[len("grpc://"):], f"reward.endpoints.{name}",
                   f"must look like grpc://host:port, got {address!r}")
            _check(name in rw.all_scorers(), f"reward.endpoints.{name}",
                   f"is not a scorer of reward.weights or reward.eval ({', '.join(rw.all_scorers())})")
        local = [name for name in rw.all_scorers() if name not in rw.endpoints]
        if "ocr" in local:
            _check((rw.ocr.det_model_dir is None) == (rw.ocr.rec_model_dir is None), "reward.ocr.det_model_dir",
                   "give reward.ocr.det_model_dir and reward.ocr.rec_model_dir together, or neither")
            _check(not rw.ocr.use_gpu or rw.num_gpus > 0, "reward.ocr.use_gpu", "needs reward.num_gpus > 0")
            _check(0.0 <= rw.ocr.min_confidence <= 1.0, "reward.ocr.min_confidence",
                   f"must lie in [0, 1] (0.5 is PaddleOCR's drop_score), got {rw.ocr.min_confidence}")
        _check("aesthetic" not in local or rw.aesthetic.head is not None, "reward.aesthetic.head",
               "give the file of the predictor's MLP weights (sac+logos+ava1-l14-linearMSE.pth)")
        for name in ("geneval", "pickscore", "aesthetic"):
            device = getattr(rw, name).device
            _check(name not in local or not device.startswith("cuda") or rw.num_gpus > 0,
                   f"reward.{name}.device", f"{device!r} needs reward.num_gpus > 0 (or use auto or cpu)")
        _check(rw.num_workers >= 1, "reward.num_workers", "must be at least 1")
        _check(rw.batch_size >= 1, "reward.batch_size", "must be at least 1")
        _check(rw.retries >= 0, "reward.retries", "must be >= 0")
        _check(rw.timeout_s > 0, "reward.timeout_s", "must be positive")
        _check(self.rollout.num_workers >= 1, "rollout.num_workers", "must be at least 1")
        _check(self.learner.num_workers >= 1, "learner.num_workers", "must be at least 1")
        _check(self.learner.num_torch_threads is None or self.learner.num_torch_threads >= 0,
               "learner.num_torch_threads", "must be >= 0 (0: torch's default; unset: run.num_torch_threads)")
        _check(self.rollout.prompt_cache_size >= 0, "rollout.prompt_cache_size", "must be >= 0 (0: no cache)")
        for name, amount in self.rollout.resources.items():
            _check(name not in ("CPU", "GPU", "memory", "object_store_memory"), f"rollout.resources.{name}",
                   "is set by rollout.num_cpus / rollout.num_gpus (or Ray itself); name a custom resource")
            _check(0 < amount < float("inf"), f"rollout.resources.{name}", f"must be a positive number, got {amount:g}")
        if self.placement == "colocated":
            _check(self.rollout.num_workers == self.learner.num_workers, "rollout.num_workers",
                   f"colocated placement puts one rollout worker and one learner rank on each GPU: set it equal to "
                   f"learner.num_workers ({self.learner.num_workers}), got {self.rollout.num_workers}")
            share = self.rollout.num_gpus + self.learner.num_gpus
            _check(share <= 1.0 + 1e-9, "learner.num_gpus",
                   f"colocated: rollout.num_gpus + learner.num_gpus must fit one GPU (<= 1), got {share:g}; "
                   "e.g. 0.5 each")
        for section in ("rollout", "learner", "reward"):
            for key in ("num_cpus", "num_gpus"):
                _check_resource(f"{section}.{key}", getattr(getattr(self, section), key))
        _check(self.model.max_sequence_length >= 1, "model.max_sequence_length", "must be at least 1")
        r = self.run
        _check(r.iterations >= 1, "run.iterations", "must be at least 1")
        _check(r.max_staleness >= 0, "run.max_staleness",
               "must be >= 0 (async: how many policy versions a sample may lag its update; 0 is the sync schedule)")
        _check(r.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0 (0: only at the end)")
        _check(r.sample_images_every >= 0, "run.sample_images_every", "must be >= 0 (0: never)")
        _check(r.eval_every >= 0, "run.eval_every", "must be >= 0 (0: never)")
        _check(r.eval_prompts >= 0, "run.eval_prompts", "must be >= 0 (0: the whole evaluation set)")
        _check(r.eval_images_per_prompt >= 1, "run.eval_images_per_prompt",
               "must be at least 1 (the paper's: 4 for GenEval, 1 for OCR and PickScore)")
        _check(r.num_torch_threads >= 0, "run.num_torch_threads", "must be >= 0 (0: torch's default)")
        return self


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


def _check_resource(path: str, amount: float) -> None:
    """A Ray actor's share of a resource: >= 0, and GPUs as a fraction of one or whole ones
    (Ray refuses 1.5 GPUs when the actor starts, long after loading)."""
    _check(amount >= 0, path, f"must be >= 0, got {amount:g}")
    _check(not path.endswith("num_gpus") or amount <= 1 or amount == int(amount), path,
           f"must be a fraction of one GPU or a whole number of GPUs, got {amount:g}")


def check_scorer_name(name: str, path: str) -> None:
    """The one check of a scorer's name, wherever a user types it (reward.weights,
    reward.eval, `flowgrpo serve-reward --scorer`)."""
    _check(name in RewardConfig.SCORER_NAMES, path,
           f"unknown scorer {name!r}; known scorers: {', '.join(RewardConfig.SCORER_NAMES)}")


# ---------------------------------------------------------------- YAML <-> dataclasses

def from_dict(data: dict[str, Any], cls: type = Config, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<top level>'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown key; {path or 'the top level'} takes {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value if value is not None else {}, tp, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], path): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config type {tp!r}")  # a programming error, not a user error


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides (value parsed as YAML) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. run.iterations=5")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({err.problem}); quote a string "
                              "with YAML's quotes inside the shell's, e.g. --set \"run.name='a: b'\"") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None), apply overrides, validate.
    An error names what the user typed: the `--set` that gave the bad field, else the
    file, else (the file alone being valid) the `--set` flags that made it inconsistent."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    overrides = list(overrides)
    merged = apply_overrides(copy.deepcopy(data), overrides)
    try:
        return from_dict(merged).validate()
    except ConfigError as err:
        raise ConfigError(_blame(err, path, data, overrides)) from None


def _blame(err: ConfigError, path: Path | None, data: dict[str, Any], overrides: list[str]) -> str:
    """`err` prefixed with what the user typed that caused it (see load_config)."""
    field = str(err).split(":", 1)[0]
    for item in overrides:
        key = item.partition("=")[0]
        if field == key or field.startswith((key + ".", key + "[")) or key.startswith(field + "."):
            return f"--set {item}: {err}"
    if overrides and _valid(data):
        return " ".join(f"--set {item}" for item in overrides) + f": {err}"
    return f"{path}: {err}" if path else str(err)


def _valid(data: dict[str, Any]) -> bool:
    """Whether `data` alone (the file, without the overrides) is a valid config."""
    try:
        from_dict(copy.deepcopy(data)).validate()
    except ConfigError:
        return False
    return True


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
