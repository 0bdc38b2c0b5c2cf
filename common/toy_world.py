"""The toy world: scenes of coloured shapes that a tiny model can learn on a CPU, with
GenEval's prompts and metadata, so that Flow-GRPO's GenEval effect can be seen without
a GPU.

Why these objects
    A tiny SD3-architecture transformer trained for minutes draws the right colours in
    the right places but not shapes that span several tokens: circles, squares and
    triangles come out as alike blobs (shared/notes/toy-world-probe.md), and objects of
    several tokens come out ragged, a 2 x 2 block as a staircase and two blocks as one
    blob (measured on the first version of this world). So every object is ONE
    transformer token: the scene is a GRID x GRID grid of cells, each cell one token of
    SUB x SUB latent pixels (patch size SUB), and a class is the pattern it fills in its
    cell, which one token draws alone:

        dot    the top-left sub-cell           block  all four sub-cells
        bar    the top row (wide)              pole   the left column (tall)

    What a scene asks of the model across tokens, how many cells hold objects, which
    ones and in which colour, is what GenEval tests (counting, position, colour
    binding). The scene is drawn at `resolution` pixels, resolution / (GRID x SUB)
    pixels a sub-cell, exactly what the toy VAE decodes from a latent
    (common.toy_pretrain).

Why a 4 x 4 grid (16 tokens)
    The SDE's exploration noise enters every latent dimension, and the policy gradient
    carries all of it; only the few dimensions where a scene's decisions are made carry
    the reward's signal. On an 8 x 8 grid with 16 latent channels (4096 dimensions) the
    gradients of the two halves of 256 rollouts of a position prompt agreed at cosine 0.04
    (noise; tests/bench/bench_reward_landscape.py); on 4 x 4 cells with 4 channels (256
    dimensions) at 0.10 on the same prompt and 0.65 on a colour prompt, and an image takes
    a third of the time.

Prompts and metadata are GenEval's (common.prompts.geneval_prompt, the six tags):
single_object "a photo of a bar", two_object "a photo of a dot and a pole", counting
"a photo of three blocks" (2..4, with GenEval's exclude of count + 1), colors "a photo
of a red dot", position "a photo of a bar left of a pole" (include[0] is the reference),
color_attr "a photo of a blue block and a yellow bar". Objects whose colour the prompt
does not name get a random palette colour.

Splits: every prompt of the world is enumerated; per tag, in a seeded order, a prompt goes
to the test split (up to a third of the tag, at most TEST_PER_TAG) only while each of its
words in its role (`prompt_words`) stays in at least MIN_TRAIN_USES of the tag's training
prompts. What RL learns on training prompts reaches a test prompt only through words that
training holds: with a random split that put 3 of the 4 green prompts in the test, RL raised
its colour training prompts from 0.56 to 0.90 and the test's from 0.52 to 0.61; with every
colour and class kept in training, the test's rose from 0.58 to 0.80 (docs/toy_world.md). single_object has one prompt a class, so it gives one prompt to the test, whose
class the other tags' training prompts hold. The training file is written tag-balanced
(`balanced`): GenEval's test tags are about equally many, the world's are not (144 colour
attribution prompts, 4 single objects). No prompt is in both splits.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.prompts import GENEVAL_RELATIONS, GENEVAL_TAGS, geneval_prompt

GRID = 4                       # cells per side: one cell an object's place and one transformer token
SUB = 2                        # sub-cells (latent pixels) per cell side: the transformer's patch size
LATENT = GRID * SUB            # latent pixels per side (64 px images through the toy VAE's factor 8)
GAP = 1                        # free cells between any two objects
CLASSES = ("dot", "block", "bar", "pole")
# GenEval colour names and the RGB each is drawn in. The background is a plain near-white, far
# from every colour in the same direction, so that where a prompt's objects go shows in the
# mean of its scenes (an "ink" direction in latent space): a relation's layout is decided at
# the highest noise, where the model's best prediction is that mean. On mid grey the colours'
# latents average to near the background's, and the layout was never learned: the model's
# mean prediction at t = 1 for "a dot left of a pole" and "... right of ..." differed by 0.01
# a cell on grey, 0.1-0.6 on near-white (docs/toy_world.md).
PALETTE = {"red": (220, 40, 40), "yellow": (235, 210, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
BACKGROUND = (240, 240, 240)
COUNTS = (2, 3, 4)             # GenEval's counting tag
TEST_PER_TAG = 16
MIN_TRAIN_USES = 2             # a test prompt's every word stays in this many training prompts of its tag
# Each class's sub-cells in its cell, [row][column] (module doc).
PATTERNS = {"dot": ((1, 0), (0, 0)), "block": ((1, 1), (1, 1)), "bar": ((1, 1), (0, 0)), "pole": ((1, 0), (1, 0))}
_NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class ToyObject:
    """One object: its class, colour and cell (x, y), column and row on the GRID."""
    name: str
    color: str
    x: int
    y: int


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


def prompt_words(metadata: Mapping[str, Any]) -> set[tuple]:
    """What a prompt asks for, word by word in its role: each include clause's class,
    count and colour by the clause's index, and the relation."""
    words: set[tuple] = set()
    for i, clause in enumerate(metadata["include"]):
        words |= {("class", i, clause["class"]), ("count", i, clause["count"])}
        if "color" in clause:
            words.add(("color", i, clause["color"]))
        if "position" in clause:
            words.add(("relation", clause["position"][0]))
    return words


def split_prompts(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test), each in all_prompts' order: per tag, in a seeded order, a prompt is
    test while the tag's test has fewer than min(TEST_PER_TAG, a third of the tag) and
    every word of it (`prompt_words`) stays in MIN_TRAIN_USES training prompts of the
    tag; a tag where no prompt can go (single_object) gives its first in that order."""
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    held: set[str] = set()
    for tag in GENEVAL_TAGS:
        items = [p for p in prompts if p["tag"] == tag]
        uses = Counter(w for p in items for w in prompt_words(p))
        quota = min(TEST_PER_TAG, -(-len(items) // 3))
        order = [items[i] for i in rng.permutation(len(items))]
        test = []
        for p in order:
            if len(test) < quota and all(uses[w] > MIN_TRAIN_USES for w in prompt_words(p)):
                test.append(p)
                uses.subtract(prompt_words(p))
        held |= {p["prompt"] for p in test or order[:1]}
    return [p for p in prompts if p["prompt"] not in held], [p for p in prompts if p["prompt"] in held]


def balanced(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Each tag's records repeated as often as makes it at least as many as the largest
    tag's (in order, whole repeats), so that a uniform draw of lines draws the tags about
    equally often (training's PromptStream draws every line once an epoch)."""
    by_tag: dict[str, list] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
    largest = max(len(v) for v in by_tag.values())
    return [r for v in by_tag.values() for r in v * -(-largest // len(v))]


def write_splits(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write toy_geneval_train.jsonl (tag-balanced, `balanced`) and toy_geneval_test.jsonl
    (GenEval's JSONL format)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, test = split_prompts(seed)
    paths = []
    for name, records in (("train", balanced(train)), ("test", test)):
        path = directory / f"toy_geneval_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------- miscaptions

# How often a pretraining caption misdescribes its scene, per tag (common.toy_pretrain).
# Web captions, which models like SD3.5 learn from, name the objects in a picture far
# more reliably than their number, places or which colour is whose; these rates make
# the toy model learn the same unevenness: it draws what it is asked for, cleanly, and
# gets counts, positions and colour binding right only part of the time (each rate
# leaves the true reading the most frequent one, so the caption still carries it).
MISCAPTION_RATE = {"single_object": 0.2, "two_object": 0.5, "counting": 0.7,
                   "colors": 0.6, "position": 0.7, "color_attr": 0.45}


def miscaptioned(metadata: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Metadata of a scene this caption misdescribes, in the tag's typical way:
    single_object another class; two_object the second object another class; counting
    another count (1..4); colors another colour; position another relation; color_attr
    the two colours swapped."""
    tag = metadata["tag"]
    include = [dict(clause) for clause in metadata["include"]]

    def other(options: Sequence, current):
        choices = [o for o in options if o != current]
        return choices[int(rng.integers(len(choices)))]

    if tag in ("single_object", "two_object"):
        include[-1]["class"] = other(CLASSES, include[-1]["class"])
    elif tag == "counting":
        include[0]["count"] = other(range(1, max(COUNTS) + 1), include[0]["count"])
    elif tag == "colors":
        include[0]["color"] = other(list(PALETTE), include[0]["color"])
    elif tag == "position":
        include[1]["position"] = [other(GENEVAL_RELATIONS, include[1]["position"][0]), 0]
    elif tag == "color_attr":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
    else:
        raise ValueError(f"unknown tag {tag!r}; one of {', '.join(GENEVAL_TAGS)}")
    return {"tag": tag, "include": include}


def pretraining_scene_metadata(metadata: Mapping[str, Any], rng: np.random.Generator) -> Mapping[str, Any]:
    """What pretraining draws for this caption: with its tag's MISCAPTION_RATE a scene
    it misdescribes (`miscaptioned`), else its own."""
    if rng.random() < MISCAPTION_RATE[metadata["tag"]]:
        return miscaptioned(metadata, rng)
    return metadata


# ---------------------------------------------------------------- scenes

def _separate(a: ToyObject, b: ToyObject) -> bool:
    """At least GAP free cells between the two objects, along x or along y."""
    return abs(a.x - b.x) > GAP or abs(a.y - b.y) > GAP


def _holds(target: ToyObject, reference: ToyObject, relation: str) -> bool:
    """Placements where GenEval's rules (geneval_rules.relative_position) read this
    relation and no other, whatever the two classes: the cells at least two apart along
    the relation's axis and at most a third as far apart across it. (At half as far, two
    apart along and one across, a bar below a pole also reads "right of": the classes'
    boxes sit at different places in their cells.) So a scene of "a dot left of a pole"
    is a scene of no other relation, as the contrastive text pretraining assumes
    (common.toy_clip.truth_key)."""
    ox, oy = target.x - reference.x, target.y - reference.y
    if relation == "left of":
        return ox <= -2 and 3 * abs(oy) <= -ox
    if relation == "right of":
        return ox >= 2 and 3 * abs(oy) <= ox
    if relation == "above":
        return oy <= -2 and 3 * abs(ox) <= -oy
    if relation == "below":
        return oy >= 2 and 3 * abs(ox) <= oy
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
                color = clause.get("color") or colors[int(rng.integers(len(colors)))]
                for _ in range(50):
                    obj = ToyObject(clause["class"], color, int(rng.integers(GRID)), int(rng.integers(GRID)))
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
    """The scene as uint8 RGB [resolution, resolution, 3], resolution / LATENT pixels a
    sub-cell."""
    scale = resolution // LATENT
    if scale * LATENT != resolution:
        raise ValueError(f"resolution {resolution} must be a multiple of {LATENT} (the sub-cell grid)")
    colors = np.array([BACKGROUND, *PALETTE.values()], dtype=np.uint8)
    return colors[cell_colors(objects)].repeat(scale, axis=0).repeat(scale, axis=1)


def cell_colors(objects: Sequence[ToyObject]) -> np.ndarray:
    """[LATENT, LATENT] colour index per sub-cell: 0 the background, 1 + i the i-th
    PALETTE colour."""
    index = np.zeros((LATENT, LATENT), dtype=np.int64)
    names = list(PALETTE)
    for obj in objects:
        cell = index[obj.y * SUB:(obj.y + 1) * SUB, obj.x * SUB:(obj.x + 1) * SUB]
        cell[np.array(PATTERNS[obj.name], dtype=bool)] = 1 + names.index(obj.color)
    return index
