"""The GenEval detector for the toy world (common.toy_world), selected with
`reward.geneval.detector: toy`: it finds the world's rectangles by colour segmentation
and connected components, and hands the same rules (geneval_rules) the same Detection
objects the Mask2Former adapter gives them.

How an image is read
  1. Average-pool it to the GRID x GRID cell grid (the toy VAE decodes one colour a cell).
  2. Give each cell the nearest of the background grey and the PALETTE colours (RGB
     distance); the non-background cells, 4-connected, are one object, whatever their
     colours: as GenEval's detector finds objects by their shape and leaves colour to a
     classifier. (Objects of a true scene never touch: common.toy_world keeps a free cell
     between any two.)
  3. Its class from its box (w, h) in cells: one cell is a dot; a box at least ELONGATED
     cells long and twice as long as thick a bar (wider) or a pole (taller); any other
     box a block (a 2 x 2 block with a corner missing, or half of one, stays a block).
     A blob larger than any object of the world, longer than MAX_SIDE cells or of more
     than MAX_CELLS cells, is no object (a wall of colour is not a block, as GenEval's
     detector would not call it one; else painting the image one colour would pass as
     a single large block).
  4. Its score: 1 (every component, even one cell, is a whole object of some class).
  5. Its box and mask in pixels, and its colour: the palette colour most of its cells
     have (`ToyColorClassifier` reads the same back from GenEval's colour crop).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from common.toy_world import BACKGROUND, GRID, PALETTE
from services.reward.geneval_rules import Detection

ELONGATED = 3
MAX_SIDE = 4       # the longest object of the world: a bar or pole of 4 cells
MAX_CELLS = 6      # a 2 x 2 block with two cells to spare
_COLORS = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float64)   # index 0: background
_NAMES = list(PALETTE)


def cell_labels(image: np.ndarray) -> np.ndarray:
    """[GRID, GRID] nearest colour index per cell: 0 the background, 1 + i PALETTE's i-th."""
    h, w = image.shape[:2]
    if h % GRID or w % GRID:
        raise ValueError(f"toy detector: image {w}x{h} is not a multiple of the {GRID}-cell grid; "
                         f"sample at a resolution that is a multiple of {GRID} (the toy world's is 64)")
    cells = image.astype(np.float64).reshape(GRID, h // GRID, GRID, w // GRID, 3).mean(axis=(1, 3))
    return np.argmin(((cells[:, :, None, :] - _COLORS) ** 2).sum(-1), axis=-1)


def classify_shape(w: int, h: int) -> str:
    """The toy class of an object whose box is w x h cells (module doc, step 3)."""
    if w == h == 1:
        return "dot"
    if max(w, h) >= ELONGATED and max(w, h) >= 2 * min(w, h):
        return "bar" if w > h else "pole"
    return "block"


class ToyDetector:
    """Detections per class for toy-world images (module doc). Input: RGB uint8."""

    channel_order = "RGB"

    def detect(self, images: list[np.ndarray]) -> list[dict[str, list[Detection]]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> dict[str, list[Detection]]:
        labels = cell_labels(image)
        scale_y, scale_x = image.shape[0] // GRID, image.shape[1] // GRID
        found: dict[str, list[Detection]] = {}
        components, _ = ndimage.label(labels > 0)
        for label, (slice_y, slice_x) in enumerate(ndimage.find_objects(components), start=1):
            component = components[slice_y, slice_x] == label
            w, h = slice_x.stop - slice_x.start, slice_y.stop - slice_y.start
            if max(w, h) > MAX_SIDE or component.sum() > MAX_CELLS:
                continue
            color = _NAMES[int(np.bincount(labels[slice_y, slice_x][component], minlength=len(_COLORS))[1:].argmax())]
            mask = np.zeros((GRID, GRID), dtype=bool)
            mask[slice_y, slice_x] = component
            mask = mask.repeat(scale_y, axis=0).repeat(scale_x, axis=1)
            box = (float(slice_x.start * scale_x), float(slice_y.start * scale_y),
                   float(slice_x.stop * scale_x), float(slice_y.stop * scale_y))
            found.setdefault(classify_shape(w, h), []).append(Detection(box=box, score=1.0, mask=mask, color=color))
        return found


class ToyColorClassifier:
    """The colour of a GenEval colour crop (grey outside the object's mask): the palette
    colour most of its cells are nearest to. Input: PIL RGB crops."""

    channel_order = "RGB"

    def classify(self, crops: list[Image.Image], names: list[str]) -> list[str]:
        colors = []
        for crop in crops:
            pixels = np.asarray(crop.convert("RGB"), dtype=np.float64).reshape(-1, 3)
            nearest = np.argmin(((pixels[:, None, :] - _COLORS) ** 2).sum(-1), axis=-1)
            votes = np.bincount(nearest, minlength=len(_COLORS))[1:]
            colors.append(_NAMES[int(votes.argmax())])
        return colors
