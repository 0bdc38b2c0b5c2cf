"""GenEval's rules on detections, as a pure function (no model), testable by hand.

Detections per image: for each class, objects with a box (x0, y0, x1, y1) in pixels, a
score, and (for objects a colour clause looks at) a colour. `keep` applies GenEval's
selection: objects scoring above 0.3 (0.9 under the `counting` tag), sorted by score,
at most 16 per class, no NMS.

Metadata (GenEval's): {"tag", "include": [{"class", "count", "color"?, "position"?:
[relation, index of an earlier include clause]}], "exclude"?: [{"class", "count"}]}.

`evaluate` returns three verdicts:

- `correct`, the benchmark's 0/1 (GenEval's evaluate_images.py): every include clause
  holds (at least `count` objects; of the top `count`, all of the required colour; each
  of them in the required relation to every object of the referenced clause, which must
  itself have matched) and no exclude clause is met (`count` or more objects).
- `score`, the training reward with partial credit (the Flow-GRPO reward server): the
  mean over the include clauses' parts, with `found` all kept objects of the class:
      count part     1 - |count - found| / count   (not clipped: below 0 when found > 2 count)
      colour part    1 - |count - n_colour| / count, n_colour among the found objects
      position part  1 if every found object is in the relation to every object of the
                     referenced clause (which must have matched), else 0
  A count mismatch gives one 0 for the clause's colour or position part; a colour
  mismatch skips the position part. A wrong relation (`failed_relation`):
      "paper"  0 and then 1, as the paper's reward server scores it (yifan123/reward-server,
               reward_server/gen_eval.py, `evaluate_reward`: on the first object not in
               the relation it appends 0.0 and breaks out of its loops, then appends the
               1.0 that a satisfied relation gets), so a two-object position prompt with
               both objects found but wrongly placed scores (1 + 1 + 0 + 1) / 4 = 0.75;
      "once"   the failed part counted once, a single 0: (1 + 1 + 0) / 3 = 2/3.
  A relation whose referenced clause did not match is a single 0 under both.
- `strict`, 1 only if every count is exact and every part holds.
Beside them, `extra_objects`: the kept objects of the classes the prompt names beyond the
counts it asks for (per class, never below 0). `correct` asks for "at least" `count`, so a
policy trained on it can gain by drawing more objects than asked, and this shows it.
Exclude clauses enter only `correct`, as in the paper's server (an exact count already
implies GenEval's counting exclusions, which name the same class with count + 1).

Relative position of A to B (GenEval's relative_position): centres c, sizes d = (width,
height) of the boxes, offset = c_A - c_B, revised = max(|offset| - 0.1 (d_A + d_B), 0)
* sign(offset); no relation if every |revised| < 1e-3; else with (dx, dy) = revised /
||offset||: "left of" if dx < -0.5, "right of" if dx > 0.5, "above" if dy < -0.5,
"below" if dy > 0.5 (image y grows downwards).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from common.prompts import COCO_CLASSES, GENEVAL_COLORS, GENEVAL_RELATIONS

COLORS = GENEVAL_COLORS
RELATIONS = GENEVAL_RELATIONS
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1

# GenEval's 80 object names: COCO's classes in COCO order, with "mouse", "remote" and
# "keyboard" renamed "computer mouse", "tv remote", "computer keyboard".
OBJECT_NAMES = COCO_CLASSES


@dataclass
class Detection:
    """One detected object. `box` is (x0, y0, x1, y1) in pixels; `mask` a boolean
    [H, W] array or None; `color` one of COLORS once classified."""
    box: tuple[float, float, float, float]
    score: float
    mask: Optional[np.ndarray] = None
    color: Optional[str] = None


@dataclass(frozen=True)
class GenevalResult:
    correct: bool
    strict: bool
    score: float
    reason: str
    extra_objects: int


Detections = Mapping[str, Sequence[Detection]]


def keep(detections: Detections, tag: str) -> dict[str, list[Detection]]:
    """GenEval's selection: score above the tag's threshold, best first, at most 16 per class."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, objects in detections.items():
        chosen = sorted((d for d in objects if d.score > threshold), key=lambda d: d.score, reverse=True)
        if chosen:
            kept[name] = chosen[:MAX_OBJECTS]
    return kept


def objects_needing_color(metadata: Mapping[str, Any], kept: Mapping[str, Sequence[Detection]]) -> dict[str, list[Detection]]:
    """Per class, the kept objects whose colour the rules read: the top `count` of the
    class for every include clause with a colour (both verdicts look at no others)."""
    wanted: dict[str, list[Detection]] = {}
    for clause in metadata.get("include", []):
        if "color" in clause:
            top = list(kept.get(clause["class"], []))[:clause["count"]]
            if len(top) > len(wanted.get(clause["class"], [])):
                wanted[clause["class"]] = top
    return wanted


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of A to B, with a margin of 0.1 x the summed box sizes (module doc)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


FAILED_RELATION = ("paper", "once")


def evaluate(metadata: Mapping[str, Any], detections: Detections, failed_relation: str = "paper") -> GenevalResult:
    """GenEval's verdicts for one image (module doc). `detections` may be raw (they go
    through `keep`); objects a colour clause looks at must have their `color` set.
    `failed_relation` ("paper" or "once") is how `score` counts a wrong relation."""
    if failed_relation not in FAILED_RELATION:
        raise ValueError(f"failed_relation must be one of {', '.join(FAILED_RELATION)}, got {failed_relation!r}")
    check_metadata(metadata)
    kept = keep(detections, metadata["tag"])
    correct, reason = _correct(metadata, kept)
    score, strict = _score(metadata, kept, failed_relation)
    asked: dict[str, int] = {}
    for clause in metadata["include"]:
        asked[clause["class"]] = asked.get(clause["class"], 0) + clause["count"]
    extra = sum(max(len(kept.get(name, [])) - count, 0) for name, count in asked.items())
    return GenevalResult(correct=correct, strict=strict, score=score, reason=reason, extra_objects=extra)


def _colors(objects: Sequence[Detection], name: str) -> list[str]:
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"GenEval: a kept {name!r} object has colour {obj.color!r}; classify the colours "
                             f"of objects_needing_color(...) into one of {', '.join(COLORS)} first")
    return [obj.color for obj in objects]


def _in_relation(objects: Sequence[Detection], targets: Sequence[Detection], relation: str) -> bool:
    return all(relation in relative_position(obj, target) for obj in objects for target in targets)


def _correct(metadata, kept) -> tuple[bool, str]:
    """GenEval's benchmark verdict (evaluate_images.py's `evaluate`)."""
    reasons = []
    matched_groups: list[Optional[list[Detection]]] = []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = kept.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if matched and "color" in clause:
            n_color = _colors(found, name).count(clause["color"])
            if n_color < count:
                matched = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found {n_color} {clause['color']}")
        if matched and "position" in clause:
            relation, index = clause["position"]
            targets = matched_groups[index]
            if targets is None:
                matched = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not _in_relation(found, targets, relation):
                matched = False
                reasons.append(f"expected {name} {relation} target")
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        n = len(kept.get(clause["class"], []))
        if n >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return not reasons, "\n".join(reasons)


def _score(metadata, kept, failed_relation: str) -> tuple[float, bool]:
    """The training reward with partial credit and the strict verdict (module doc)."""
    parts: list[float] = []
    strict = True
    matched_groups: list[Optional[list[Detection]]] = []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = kept.get(name, [])
        parts.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in clause or "position" in clause:
                parts.append(0.0)
        else:
            if "color" in clause:
                n_color = _colors(found, name).count(clause["color"])
                parts.append(1 - abs(count - n_color) / count)
                matched = n_color == count
            if matched and "position" in clause:
                relation, index = clause["position"]
                targets = matched_groups[index]
                matched = targets is not None and _in_relation(found, targets, relation)
                parts.append(1.0 if matched else 0.0)
                if targets is not None and not matched and failed_relation == "paper":
                    parts.append(1.0)
        strict = strict and matched
        matched_groups.append(found if matched else None)
    return (sum(parts) / len(parts) if parts else 0.0), strict


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError naming the field when metadata is not GenEval's format (a data
    error, reported as such rather than as a KeyError deep in the rules)."""
    if "tag" not in metadata or not isinstance(metadata.get("include"), list) or not metadata["include"]:
        raise ValueError(f"GenEval metadata needs 'tag' and a non-empty 'include' list, got {dict(metadata)}")
    for clause in list(metadata["include"]) + list(metadata.get("exclude", [])):
        if not isinstance(clause.get("class"), str) or not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise ValueError(f"GenEval metadata clause {clause}: needs 'class' (a string) and 'count' (>= 1)")
    for i, clause in enumerate(metadata["include"]):
        if "color" in clause and clause["color"] not in COLORS:
            raise ValueError(f"GenEval metadata include[{i}].color {clause['color']!r} is not one of {', '.join(COLORS)}")
        if "position" in clause:
            relation, index = clause["position"]
            if relation not in RELATIONS or not 0 <= index < i:
                raise ValueError(f"GenEval metadata include[{i}].position {clause['position']}: needs "
                                 f"[one of {', '.join(RELATIONS)}, index of an earlier include clause]")
