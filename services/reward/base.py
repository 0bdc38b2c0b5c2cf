"""The scorer interface every reward implements, in process or behind the gRPC service.

A scorer maps a batch of images with their prompts and metadata to one float per image:

    score(images, prompts, metadata) -> ScoreOutput(scores[N], details[N], counts)

Images are uint8 RGB arrays [H, W, 3] (or a [N, H, W, 3] array, or PIL images, which
are converted to RGB). Every adapter that hands images to a library converts to the
channel order that library expects and says which in its docstring (OCR engines
declare it as `channel_order`, which OcrEngine.lines applies), because a silent
RGB/BGR swap changes detector and OCR outputs without failing.

`details` carry per-image JSON-able facts (the text read, GenEval's verdicts) and
`counts` how often something noteworthy happened in the call (an OCR engine error,
nothing recognised); the reward worker adds the counts to its metrics. A scorer that
cannot score one image returns NaN for it with `details[i]["error"]`: the worker then
drops that image's group instead of training on a made-up number.

Heavy libraries (torch, transformers, OCR engines) are imported inside the scorers
that need them, so this package imports in a lean environment (a gRPC service for
one engine needs only numpy, Pillow, grpcio and protobuf besides that engine).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from PIL import Image

from common.config import RewardConfig


@dataclass
class ScoreOutput:
    scores: np.ndarray
    details: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ScorerNeeds:
    """What a scorer asks of the process that hosts it: Ray resources and the pip
    packages a `runtime_env` must add to the project's own dependencies."""
    num_gpus: float
    num_cpus: float
    pip: list[str]


def to_rgb_arrays(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> list[np.ndarray]:
    """uint8 RGB [H, W, 3] arrays from a [N, H, W, 3] array or a list of arrays / PIL images."""
    out = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image {i}: expected uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
        out.append(image)
    return out


class Scorer(ABC):
    """Base of every reward. Subclasses set `name`, set `engine` (a short token naming
    the model or engine and its backend, logged with every reward) in `__init__`, and
    implement `_score` on validated RGB arrays."""

    name: ClassVar[str]
    engine: str = ""

    @classmethod
    def needs(cls, config: RewardConfig) -> ScorerNeeds:
        """CPU-only, nothing beyond the project's dependencies; scorers that can use a
        GPU or an optional engine override this."""
        return ScorerNeeds(num_gpus=0.0, num_cpus=config.num_cpus, pip=[])

    @staticmethod
    def model_needs(config: RewardConfig, device: str) -> ScorerNeeds:
        """A scorer that runs a torch model: the reward worker's GPU share
        (reward.num_gpus) unless the scorer's device is the CPU."""
        return ScorerNeeds(num_gpus=0.0 if device == "cpu" else config.num_gpus, num_cpus=config.num_cpus, pip=[])

    def score(self, images, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreOutput:
        arrays = to_rgb_arrays(images)
        if not len(arrays) == len(prompts) == len(metadata):
            raise ValueError(f"{self.name}: {len(arrays)} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata rows; they must be equal")
        out = self._score(arrays, list(prompts), list(metadata))
        out.scores = np.asarray(out.scores, dtype=np.float64)
        if out.scores.shape != (len(arrays),) or len(out.details) != len(arrays):
            raise RuntimeError(f"{self.name}: returned {out.scores.shape} scores and {len(out.details)} "
                               f"details for {len(arrays)} images")
        return out

    @abstractmethod
    def _score(self, images: list[np.ndarray], prompts: list[str],
               metadata: list[Mapping[str, Any]]) -> ScoreOutput:
        ...
