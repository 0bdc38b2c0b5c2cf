"""The GenEval detector for the toy world (common.toy_world), selected with
`reward.geneval.detector: toy`: it reads the world's objects cell by cell from colour
segmentation, and hands the same rules (geneval_rules) the same Detection objects the
Mask2Former adapter gives them.

How an image is read
  1. Average-pool it to the LATENT x LATENT sub-cell grid (the toy VAE decodes one
     colour a latent pixel), and give each sub-cell the nearest of the background
     and the PALETTE colours (RGB distance).
  2. Each cell of the GRID (SUB x SUB sub-cells, one transformer token) holds at most
     one object: as GenEval's detector finds objects by their shape and leaves colour
     to a classifier, its class is the shape its coloured sub-cells make, whatever
     their colours: one sub-cell a dot, two side by side a bar, two one above the
     other a pole, three or four a block (a block with a corner missing stays a
     block). Two diagonal sub-cells make no shape of the world: no object.
  3. Its score: 1 (every shape the world has is a whole object).
  4. Its box and mask in pixels: those of its coloured sub-cells; its colour: the
     palette colour most of them have (`ToyColorClassifier` reads the same back from
     GenEval's colour crop).
  A policy that paints the whole image gets a block in every cell: 64 blocks, which
  fail every count and every prompt of one or two objects.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageColor

from common.toy_world import BACKGROUND, GRID, LATENT, PALETTE, SUB
from services.reward.geneval import BACKGROUND as CROP_BACKGROUND
from services.reward.geneval_rules import Detection

_COLORS = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float64)   # index 0: background
_NAMES = list(PALETTE)
# A colour crop's pixels: the world's background, GenEval's grey outside the mask (nearer
# to green than to the near-white background, so it must not vote), then the palette.
_CROP_COLORS = np.insert(_COLORS, 1, ImageColor.getrgb(CROP_BACKGROUND), axis=0)


def cell_labels(image: np.ndarray) -> np.ndarray:
    """[LATENT, LATENT] nearest colour index per sub-cell: 0 the background, 1 + i
    PALETTE's i-th."""
    h, w = image.shape[:2]
    if h % LATENT or w % LATENT:
        raise ValueError(f"toy detector: image {w}x{h} is not a multiple of the {LATENT}-sub-cell grid; "
                         f"sample at a resolution that is a multiple of {LATENT} (the toy config's is 64)")
    cells = image.astype(np.float64).reshape(LATENT, h // LATENT, LATENT, w // LATENT, 3).mean(axis=(1, 3))
    return np.argmin(((cells[:, :, None, :] - _COLORS) ** 2).sum(-1), axis=-1)


def classify_pattern(filled: np.ndarray) -> str | None:
    """The toy class of a cell whose SUB x SUB sub-cells `filled` (bool) are coloured,
    or None (module doc, step 2)."""
    rows, cols = np.nonzero(filled)
    if len(rows) == 0:
        return None
    if len(rows) == 1:
        return "dot"
    if len(rows) >= 3:
        return "block"
    if rows[0] == rows[1]:
        return "bar"
    if cols[0] == cols[1]:
        return "pole"
    return None


class ToyDetector:
    """Detections per class for toy-world images (module doc). Input: RGB uint8."""

    channel_order = "RGB"

    def detect(self, images: list[np.ndarray]) -> list[dict[str, list[Detection]]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> dict[str, list[Detection]]:
        labels = cell_labels(image)
        scale = image.shape[0] // LATENT
        found: dict[str, list[Detection]] = {}
        for y in range(GRID):
            for x in range(GRID):
                cell = labels[y * SUB:(y + 1) * SUB, x * SUB:(x + 1) * SUB]
                name = classify_pattern(cell > 0)
                if name is None:
                    continue
                rows, cols = np.nonzero(cell)
                color = _NAMES[int(np.bincount(cell[rows, cols], minlength=len(_COLORS))[1:].argmax())]
                mask = np.zeros((LATENT, LATENT), dtype=bool)
                mask[y * SUB + rows, x * SUB + cols] = True
                mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
                box = (float((x * SUB + cols.min()) * scale), float((y * SUB + rows.min()) * scale),
                       float((x * SUB + cols.max() + 1) * scale), float((y * SUB + rows.max() + 1) * scale))
                found.setdefault(name, []).append(Detection(box=box, score=1.0, mask=mask, color=color))
        return found


class ToyColorClassifier:
    """The colour of a GenEval colour crop (grey outside the object's mask): the palette
    colour most of its cells are nearest to. Input: PIL RGB crops."""

    channel_order = "RGB"

    def classify(self, crops: list[Image.Image], names: list[str]) -> list[str]:
        colors = []
        for crop in crops:
            pixels = np.asarray(crop.convert("RGB"), dtype=np.float64).reshape(-1, 3)
            nearest = np.argmin(((pixels[:, None, :] - _CROP_COLORS) ** 2).sum(-1), axis=-1)
            votes = np.bincount(nearest, minlength=len(_CROP_COLORS))[2:]
            colors.append(_NAMES[int(votes.argmax())])
        return colors
