"""The toy world: scenes of coloured rectangles that a tiny model can learn on a CPU,
with GenEval's prompts and metadata, so that Flow-GRPO's GenEval effect can be seen
without a GPU.

Why these objects
    A tiny SD3-architecture transformer trained for minutes draws compact, correctly
    coloured blobs but no crisp geometry: circles, squares and triangles come out alike
    (shared/notes/toy-world-probe.md), and objects several latent pixels across come out
    ragged. So the world is drawn in whole cells, one cell a latent pixel and one
    transformer token (patch size 1), and its four classes differ in what such a model
    can draw, size and elongation, which a detector reads from a blob's box:

        dot    1 x 1 cell        block  2 x 2 cells
        bar    wide,  3 x 1 or 4 x 1 cells
        pole   tall,  the bar turned upright

    The scene is laid out on the GRID x GRID latent grid and drawn at `resolution`
    pixels with resolution / GRID pixels a cell, so every scene is exactly what the toy
    VAE decodes from a latent (common.toy_pretrain).

Prompts and metadata are GenEval's (common.prompts.geneval_prompt, the six tags):
single_object "a photo of a bar", two_object "a photo of a dot and a pole", counting
"a photo of three blocks" (2..4, with GenEval's exclude of count + 1), colors "a photo
of a red dot", position "a photo of a bar left of a pole" (include[0] is the reference),
color_attr "a photo of a blue block and a yellow bar". Objects whose colour the prompt
does not name get a random palette colour.

Splits: every prompt of the world is enumerated; per tag a seeded third (at most
TEST_PER_TAG, at least one) is the test split, the rest the training split; no prompt is
in both.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.prompts import GENEVAL_RELATIONS, GENEVAL_TAGS, geneval_prompt

GRID = 8                       # cells per side: the latent size (64 px images, VAE factor 8)
GAP = 1                        # free cells between any two objects
CLASSES = ("dot", "block", "bar", "pole")
# GenEval colour names and the RGB each is drawn in; the background is a plain mid grey.
PALETTE = {"red": (220, 40, 40), "yellow": (235, 210, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
BACKGROUND = (128, 128, 128)
COUNTS = (2, 3, 4)             # GenEval's counting tag
TEST_PER_TAG = 16
_NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class ToyObject:
    """One rectangle on the cell grid: (x, y) its top-left cell, (w, h) its size in cells."""
    name: str
    color: str
    x: int
    y: int
    w: int
    h: int

    def box(self, cell: float = 1.0) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), x1/y1 exclusive, in units of `cell`."""
        return self.x * cell, self.y * cell, (self.x + self.w) * cell, (self.y + self.h) * cell


def object_size(name: str, rng: np.random.Generator) -> tuple[int, int]:
    """(w, h) in cells of an object of class `name` (module doc)."""
    if name == "dot":
        return 1, 1
    if name == "block":
        return 2, 2
    length = int(rng.integers(3, 5))
    return (length, 1) if name == "bar" else (1, length)


# ---------------------------------------------------------------- prompts

def all_prompts() -> list[dict[str, Any]]:
    """Every prompt of the world as GenEval metadata (with "prompt"), in a fixed order."""
    colors = list(PALETTE)
    out: list[dict[str, Any]] = []

    def add(tag: str, include: list[dict[str, Any]], exclude: list[dict[str, Any]] | None = None) -> None:
        out.append({"tag": tag, "include": include, **({"exclude": exclude} if exclude else {}),
                    "prompt": geneval_prompt(tag, include)})

    for a in CLASSES:
        add("single_object", [{"class": a, "count": 1}])
    for a, b in itertools.permutations(CLASSES, 2):
        add("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}])
    for a in CLASSES:
        for n in COUNTS:
            add("counting", [{"class": a, "count": n}], [{"class": a, "count": n + 1}])
    for a in CLASSES:
        for c in colors:
            add("colors", [{"class": a, "count": 1, "color": c}])
    for a, b in itertools.permutations(CLASSES, 2):
        for relation in GENEVAL_RELATIONS:
            add("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}])
    for (a, b), (ca, cb) in itertools.product(itertools.permutations(CLASSES, 2), itertools.permutations(colors, 2)):
        add("color_attr", [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
    return out


def split_prompts(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): per tag a seeded third of the prompts (1..TEST_PER_TAG) is test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    prompts = all_prompts()
    for tag in GENEVAL_TAGS:
        items = [p for p in prompts if p["tag"] == tag]
        order = rng.permutation(len(items))
        n_test = min(TEST_PER_TAG, max(1, -(-len(items) // 3)))
        test += [items[i] for i in sorted(order[:n_test])]
        train += [items[i] for i in sorted(order[n_test:])]
    return train, test


def write_splits(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write toy_geneval_train.jsonl and toy_geneval_test.jsonl (GenEval's JSONL format)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("train", "test"), split_prompts(seed)):
        path = directory / f"toy_geneval_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------- scenes

def _separate(a: ToyObject, b: ToyObject) -> bool:
    """At least GAP free cells between the two boxes, along x or along y."""
    return (a.x + a.w + GAP <= b.x or b.x + b.w + GAP <= a.x or
            a.y + a.h + GAP <= b.y or b.y + b.h + GAP <= a.y)


def _holds(target: ToyObject, reference: ToyObject, relation: str) -> bool:
    """A sufficient condition for GenEval's relation (geneval_rules.relative_position):
    the boxes separated along the relation's axis and the centre offset at least as long
    along it as across. Then the revised offset along the axis is at least 0.8 of the
    offset, and 0.8 |o_axis| > 0.5 |o| holds whenever |o_across| <= |o_axis|."""
    ox = (target.x + target.w / 2) - (reference.x + reference.w / 2)
    oy = (target.y + target.h / 2) - (reference.y + reference.h / 2)
    if relation == "left of":
        return target.x + target.w <= reference.x and abs(oy) <= -ox
    if relation == "right of":
        return reference.x + reference.w <= target.x and abs(oy) <= ox
    if relation == "above":
        return target.y + target.h <= reference.y and abs(ox) <= -oy
    if relation == "below":
        return reference.y + reference.h <= target.y and abs(ox) <= oy
    raise ValueError(f"unknown relation {relation!r}; one of {', '.join(GENEVAL_RELATIONS)}")


def sample_scene(metadata: Mapping[str, Any], rng: np.random.Generator, tries: int = 1000) -> list[ToyObject]:
    """Objects that make `metadata` true: each include clause's count of its class, in
    its colour (else random colours), in its relation to the referenced clause's
    objects; nothing else. Placement is random, by rejection."""
    colors = list(PALETTE)
    for _ in range(tries):
        placed: list[ToyObject] = []
        groups: list[list[ToyObject]] = []
        ok = True
        for clause in metadata["include"]:
            group = []
            for _ in range(clause["count"]):
                w, h = object_size(clause["class"], rng)
                color = clause.get("color") or colors[int(rng.integers(len(colors)))]
                for _ in range(50):
                    obj = ToyObject(clause["class"], color, int(rng.integers(0, GRID - w + 1)),
                                    int(rng.integers(0, GRID - h + 1)), w, h)
                    fits = all(_separate(obj, other) for other in placed)
                    if fits and "position" in clause:
                        relation, index = clause["position"]
                        fits = all(_holds(obj, ref, relation) for ref in groups[index])
                    if fits:
                        break
                else:
                    ok = False
                    break
                placed.append(obj)
                group.append(obj)
            if not ok:
                break
            groups.append(group)
        if ok:
            return placed
    raise RuntimeError(f"no scene found for {metadata.get('prompt')!r} in {tries} tries")


def render(objects: Sequence[ToyObject], resolution: int = 64) -> np.ndarray:
    """The scene as uint8 RGB [resolution, resolution, 3], resolution / GRID pixels a cell."""
    cells = np.empty((GRID, GRID, 3), dtype=np.uint8)
    cells[:] = BACKGROUND
    for obj in objects:
        cells[obj.y:obj.y + obj.h, obj.x:obj.x + obj.w] = PALETTE[obj.color]
    scale = resolution // GRID
    if scale * GRID != resolution:
        raise ValueError(f"resolution {resolution} must be a multiple of {GRID} (the cell grid)")
    return cells.repeat(scale, axis=0).repeat(scale, axis=1)


def cell_colors(objects: Sequence[ToyObject]) -> np.ndarray:
    """[GRID, GRID] index per cell: 0 the background, 1 + i the i-th PALETTE colour."""
    index = np.zeros((GRID, GRID), dtype=np.int64)
    names = list(PALETTE)
    for obj in objects:
        index[obj.y:obj.y + obj.h, obj.x:obj.x + obj.w] = 1 + names.index(obj.color)
    return index
