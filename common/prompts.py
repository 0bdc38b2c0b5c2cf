"""Prompt sets: plain text, the paper's OCR prompts and GenEval metadata.

`load_prompts(path, format)` reads a prompt file into `PromptRecord`s; `PromptStream`
turns them into the deterministic, resumable stream the controller draws from;
`generate_geneval_prompts` builds GenEval-style training metadata, because the
paper's GenEval training split is not published with its code.

Formats (`common.config.PromptsConfig.format`):

    text     one prompt a line; blank lines are skipped
    ocr      like text, and every prompt quotes the text to render ("..."); metadata {"target": ...}
    geneval  one JSON object a line, as GenEval's metadata: {"tag", "include": [{"class",
             "count", "color"?, "position"?: [relation, index]}], "exclude"?: [...], "prompt"};
             the whole object is the record's metadata (the GenEval scorer reads it)

Relative prompt paths are looked up in the working directory first, then in the shared
datasets directory named by the environment variable FLOWGRPO_DATASETS (a directory
laid out as geneval/, ocr/, pickscore/), so configs can say `ocr/test.txt`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

DATASETS_ENV = "FLOWGRPO_DATASETS"
FORMATS = ("text", "ocr", "geneval")


class PromptFileError(ValueError):
    """A prompt file is empty or has a line that its format does not allow."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and what the scorers need to judge its images (OCR target, GenEval
    include/exclude); `metadata` travels on the wire as the JSON `metadata` column."""
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def extract_ocr_target(prompt: str) -> str:
    """The text an OCR prompt asks to render: what stands between its first pair of
    double quotes (the paper's rule). Raises ValueError when there is none."""
    first = prompt.find('"')
    second = prompt.find('"', first + 1) if first >= 0 else -1
    if first < 0 or second < 0:
        raise ValueError(f'OCR prompt has no text between double quotes: {prompt[:80]!r}')
    target = prompt[first + 1:second]
    if not target.strip():
        raise ValueError(f'OCR prompt quotes an empty text: {prompt[:80]!r}')
    return target


# ---------------------------------------------------------------- loading

def resolve_prompt_path(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; else, for a relative path, the same
    path under $FLOWGRPO_DATASETS. Raises FileNotFoundError saying where it looked."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    root = os.environ.get(DATASETS_ENV)
    if not path.is_absolute() and root and (Path(root) / path).exists():
        return Path(root) / path
    where = f"${DATASETS_ENV}={root}" if root else f"${DATASETS_ENV} (not set)"
    raise FileNotFoundError(
        f"prompt file {path} not found in the working directory {Path.cwd()} nor under {where}; "
        f"give an existing path or set {DATASETS_ENV} to the datasets directory")


def load_prompts(path: str | os.PathLike, format: str = "text") -> list[PromptRecord]:
    """Read a prompt file (located with `resolve_prompt_path`) in one of `FORMATS`.
    Raises PromptFileError naming the file, the 1-based line and what is wrong."""
    if format not in FORMATS:
        raise ValueError(f"prompt format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = resolve_prompt_path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None
    parse = {"text": _text_record, "ocr": _ocr_record, "geneval": _geneval_record}[format]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(parse(line.strip()))
        except ValueError as err:
            raise PromptFileError(f"{path}:{number}: {err}") from None
    if not records:
        raise PromptFileError(f"{path}: contains no prompts (the file is empty or only blank lines)")
    return records


def _text_record(line: str) -> PromptRecord:
    return PromptRecord(line)


def _ocr_record(line: str) -> PromptRecord:
    return PromptRecord(line, {"target": extract_ocr_target(line)})


def _geneval_record(line: str) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno}); "
                         "the geneval format takes one JSON object a line") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('missing "prompt" (a non-empty string)')
    if not isinstance(obj.get("tag"), str):
        raise ValueError(f'missing "tag" (a string, one of {", ".join(GENEVAL_TAGS)})')
    include = obj.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f'"include" must be a non-empty list of {{"class", "count"}} objects, got {include!r}')
    _check_objects(include, "include")
    if "exclude" in obj:
        if not isinstance(obj["exclude"], list):
            raise ValueError(f'"exclude" must be a list of {{"class", "count"}} objects, got {obj["exclude"]!r}')
        _check_objects(obj["exclude"], "exclude")
    return PromptRecord(prompt, obj)


def _check_objects(items: list, key: str) -> None:
    for i, item in enumerate(items):
        where = f'"{key}"[{i}]'
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            raise ValueError(f'{where} must be an object with a "class" string, got {item!r}')
        count = item.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f'{where}: "count" must be a whole number >= 0, got {count!r}')
        if "color" in item and not isinstance(item["color"], str):
            raise ValueError(f'{where}: "color" must be a string, got {item["color"]!r}')
        position = item.get("position")
        if position is not None and not (isinstance(position, list) and len(position) == 2
                                         and isinstance(position[0], str) and isinstance(position[1], int)):
            raise ValueError(f'{where}: "position" must be [relation, index of the reference object], got {position!r}')


# ---------------------------------------------------------------- the stream

class PromptStream:
    """An endless, deterministic stream of prompts: epoch e visits every record once in
    the order of numpy's `default_rng(seed + e).permutation`. Batches run across epoch
    boundaries without a gap, and `state()`/`restore()` let a resumed run draw exactly
    the prompts the interrupted one would have drawn.

    Each draw carries a global index, `epoch * len(stream) + position`: unique for the
    whole run, so it serves as the group key (`prompt_index` on the wire) even when one
    prompt is drawn twice in a batch."""

    def __init__(self, records: Sequence[PromptRecord], seed: int):
        if not records:
            raise ValueError("PromptStream needs at least one prompt")
        self.records = list(records)
        self.seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.records)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.records))

    def next_batch(self, n: int) -> list[tuple[int, PromptRecord]]:
        """The next `n` draws as (global index, record)."""
        batch = []
        while len(batch) < n:
            if self._position == len(self.records):
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
            index = self._epoch * len(self.records) + self._position
            batch.append((index, self.records[self._order[self._position]]))
            self._position += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()` taken with the same records and seed."""
        epoch, position = state["epoch"], state["position"]
        if epoch < 0 or not 0 <= position <= len(self.records):
            raise ValueError(f"prompt stream state {state} does not fit a stream of {len(self.records)} prompts "
                             "(position must lie in [0, len]); was the checkpoint taken with another prompt file?")
        self._epoch, self._position = int(epoch), int(position)
        self._order = self._permutation(self._epoch)


# ---------------------------------------------------------------- GenEval training prompts

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# The 80 COCO classes as GenEval spells them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _plural(noun: str) -> str:
    # GenEval's own rule, kept for identical prompts ("buses", "knifes", "sheeps").
    return f"{noun}es" if noun.endswith("s") else f"{noun}s"


def geneval_prompt(tag: str, include: Sequence[dict[str, Any]]) -> str:
    """The prompt GenEval writes for `tag` and `include` (e.g. "a photo of a cow right of
    a laptop", where the laptop is include[0], the reference of the position)."""
    if tag == "counting":
        item = include[0]
        return f"a photo of {_NUMBER_WORDS[item['count']]} {_plural(item['class'])}"
    if tag == "position":
        reference, target = include
        return f"a photo of {_article(target['class'])} {target['position'][0]} {_article(reference['class'])}"
    nouns = [f"{item['color']} {item['class']}" if "color" in item else item["class"] for item in include]
    return "a photo of " + " and ".join(_article(noun) for noun in nouns)


def generate_geneval_prompts(n: int, seed: int, avoid: Collection[str] = ()) -> list[PromptRecord]:
    """`n` GenEval-style training prompts, the six tags drawn uniformly, in the format of
    GenEval's metadata (each record's metadata is one JSONL object of that format); the
    same for the same seed. Prompts in `avoid` (e.g. the test set's) are never produced;
    a tag whose every prompt is avoided drops out (single_object has only 80 prompts)."""
    rng = np.random.default_rng(seed)
    avoid = set(avoid)
    records: list[PromptRecord] = []
    max_draws = 100 * n + 100  # bounded: `avoid` could exclude nearly everything
    for _ in range(max_draws):
        if len(records) == n:
            break
        tag = GENEVAL_TAGS[rng.integers(len(GENEVAL_TAGS))]
        a, b = (COCO_CLASSES[i] for i in rng.choice(len(COCO_CLASSES), 2, replace=False))
        color_a, color_b = (GENEVAL_COLORS[i] for i in rng.choice(len(GENEVAL_COLORS), 2, replace=False))
        exclude = None
        if tag == "single_object":
            include = [{"class": a, "count": 1}]
        elif tag == "two_object":
            include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        elif tag == "counting":
            count = int(rng.integers(2, 5))
            include = [{"class": a, "count": count}]
            exclude = [{"class": a, "count": count + 1}]
        elif tag == "colors":
            include = [{"class": a, "count": 1, "color": color_a}]
        elif tag == "position":
            relation = GENEVAL_RELATIONS[rng.integers(len(GENEVAL_RELATIONS))]
            include = [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [relation, 0]}]
        else:  # color_attr
            include = [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}]
        prompt = geneval_prompt(tag, include)
        if prompt in avoid:
            continue
        metadata = {"tag": tag, "include": include, **({"exclude": exclude} if exclude else {}), "prompt": prompt}
        records.append(PromptRecord(prompt, metadata))
    if len(records) < n:
        raise ValueError(f"generate_geneval_prompts: found only {len(records)} of {n} prompts outside `avoid` "
                         f"in {max_draws} draws; avoid fewer prompts")
    return records
