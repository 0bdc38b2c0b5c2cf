"""GenEval with a transformers detector: the GenEval reward on a Mask2Former COCO
instance model and CLIP colour classification, both loaded through transformers.

The benchmark's own detector is mmdetection 2.x's Mask2Former Swin-S, which needs its
own environment; to use it, serve a scorer wrapping it with `flowgrpo serve-reward` and
set reward.endpoints.geneval. Here the detector is behind an adapter
(`Mask2FormerDetector`; default facebook/mask2former-swin-small-coco-instance, the same
architecture and training set from the Mask2Former authors' release, ported to
transformers), and the rules are `geneval_rules.evaluate`, exactly GenEval's. Weights
and preprocessing differ from mmdet's, so verdicts are close to, not identical with,
the benchmark's.

Colour of an object (GenEval's): zero-shot CLIP (default openai/clip-vit-large-patch14,
GenEval's ViT-L/14) over the 10 colours, each colour's text embedding the renormalised
mean of the normalised embeddings of "a photo of a {c} {class}", "a photo of a
{c}-colored {class}" and "a photo of a {c} object"; the image is the object's box crop
with everything outside its mask painted grey #999.

Channel order: both adapters take RGB, and hand transformers PIL RGB images. (mmdet's
`inference_detector` takes BGR arrays; the paper's reward server passed it RGB arrays.)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from common.config import RewardConfig
from services.reward.base import ScoreOutput, Scorer, ScorerNeeds
from services.reward.geneval_rules import (
    COLORS, OBJECT_NAMES, THRESHOLD, Detection, check_metadata, evaluate, keep, objects_needing_color)

# COCO label names that GenEval renames (GenEval's object_names.txt).
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
BACKGROUND = "#999"
TOY_DETECTOR = "toy"  # reward.geneval.detector naming the toy world's detector instead of a model


def geneval_label_names(id2label: dict[int, str]) -> dict[int, str]:
    """Map a detector's label ids to GenEval's object names. Labels outside GenEval's 80
    are left out; a detector that misses any of the 80 is refused, since its objects
    would silently count as absent."""
    names = {}
    for index, label in id2label.items():
        name = COCO_TO_GENEVAL.get(label.strip().lower(), label.strip().lower())
        if name in OBJECT_NAMES:
            names[int(index)] = name
    missing = sorted(set(OBJECT_NAMES) - set(names.values()))
    if missing:
        raise ValueError(f"reward.geneval.detector: the model's labels (config.id2label) lack GenEval classes "
                         f"{', '.join(missing)}; use a COCO instance-segmentation model")
    return names


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) enclosing a boolean mask, x1/y1 exclusive (mmdet's mask2bbox)."""
    xs = np.flatnonzero(mask.any(axis=0))
    ys = np.flatnonzero(mask.any(axis=1))
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def crop_for_color(image: np.ndarray, obj: Detection) -> Image.Image:
    """GenEval's colour crop: grey #999 outside the object's mask, cut to its box."""
    picture = Image.fromarray(image)
    if obj.mask is not None:
        blank = Image.new("RGB", picture.size, BACKGROUND)
        picture = Image.composite(picture, blank, Image.fromarray(obj.mask.astype(np.uint8) * 255))
    return picture.crop(tuple(int(round(v)) for v in obj.box))


def clip_embeds(output):
    """transformers 5's CLIPModel.get_*_features return a model output whose
    pooler_output is the projected embedding; earlier versions return the tensor."""
    import torch
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Mask2FormerDetector:
    """Instance detections per class from a transformers Mask2Former (hub id or local
    path). Scores and masks are Mask2Former's instance post-processing (top queries x
    classes, class probability x mean mask probability, as mmdet's); boxes enclose the
    masks. Input: RGB."""

    def __init__(self, path: str, device):
        import torch
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
        self._torch = torch
        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path).eval().to(device)
        self.names = geneval_label_names(self.model.config.id2label)

    def detect(self, images: list[np.ndarray]) -> list[dict[str, list[Detection]]]:
        inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        with self._torch.no_grad():
            outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items() if k in ("pixel_values", "pixel_mask")})
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=THRESHOLD, target_sizes=[im.shape[:2] for im in images], return_binary_maps=True)
        detections = []
        for result in results:
            found: dict[str, list[Detection]] = {}
            masks = result["segmentation"].bool().cpu().numpy() if result["segments_info"] else []
            for info, mask in zip(result["segments_info"], masks):
                name = self.names.get(info["label_id"])
                if name is not None:
                    found.setdefault(name, []).append(Detection(box=mask_box(mask), score=info["score"], mask=mask))
            detections.append(found)
        return detections


class ClipColorClassifier:
    """GenEval's zero-shot colour classifier on a transformers CLIPModel (hub id or local
    path). Input: PIL RGB crops."""

    def __init__(self, path: str, device):
        import torch
        from transformers import AutoProcessor, CLIPModel
        self._torch = torch
        self.device = device
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self._classifiers: dict[str, object] = {}

    def _classifier(self, name: str):
        """[10 colours, D]: per colour the renormalised mean of its normalised template embeddings."""
        if name not in self._classifiers:
            texts = [t.format(c=c, cls=name) for c in COLORS for t in COLOR_TEMPLATES]
            tokens = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with self._torch.no_grad():
                emb = clip_embeds(self.model.get_text_features(**tokens))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            per_color = emb.reshape(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._classifiers[name] = per_color / per_color.norm(dim=-1, keepdim=True)
        return self._classifiers[name]

    def classify(self, crops: list[Image.Image], names: list[str]) -> list[str]:
        if not crops:
            return []
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        with self._torch.no_grad():
            emb = clip_embeds(self.model.get_image_features(pixel_values=pixels))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return [COLORS[int((self._classifier(name) @ e).argmax())] for e, name in zip(emb, names)]


class GenevalScorer(Scorer):
    """GenEval with a transformers detector (module doc). The reward is
    reward.geneval.reward: "score" (partial credit, the paper's training reward, with a
    wrong relation counted as reward.geneval.failed_relation says), "strict" or
    "correct" (the benchmark's 0/1); details carry all three, the tag and the reason.
    Metadata that is not GenEval's gives NaN for that image, with the error."""

    name = "geneval"

    def __init__(self, config: RewardConfig):
        from common.models import resolve_device
        cfg = config.geneval
        self.reward = cfg.reward
        self.failed_relation = cfg.failed_relation
        if cfg.detector == TOY_DETECTOR:  # the toy world's shapes (common/toy_world.py), no model
            from services.reward.toy_detector import ToyColorClassifier, ToyDetector
            self.detector, self.colors, self.engine = ToyDetector(), ToyColorClassifier(), "toy-detector"
            return
        device = resolve_device(cfg.device)
        self.detector = Mask2FormerDetector(cfg.detector, device)
        self.colors = ClipColorClassifier(cfg.clip, device)
        self.engine = f"transformers-mask2former:{cfg.detector}+clip:{cfg.clip}:{device.type}"

    @classmethod
    def needs(cls, config: RewardConfig) -> ScorerNeeds:
        device = "cpu" if config.geneval.detector == TOY_DETECTOR else config.geneval.device
        return cls.model_needs(config, device)

    def _score(self, images, prompts, metadata):
        errors = {}
        for i, meta in enumerate(metadata):
            try:
                check_metadata(meta)
            except ValueError as err:
                errors[i] = str(err)
        detections = self.detector.detect(images)
        kept = [keep(d, m.get("tag", "")) for d, m in zip(detections, metadata)]
        jobs = [(i, name, obj) for i, (k, m) in enumerate(zip(kept, metadata)) if i not in errors
                for name, objs in objects_needing_color(m, k).items() for obj in objs]
        colors = self.colors.classify([crop_for_color(images[i], obj) for i, _, obj in jobs],
                                      [name for _, name, _ in jobs])
        for (_, _, obj), color in zip(jobs, colors):
            obj.color = color
        scores, details = [], []
        for i, (k, meta) in enumerate(zip(kept, metadata)):
            if i in errors:
                scores.append(float("nan"))
                details.append({"error": errors[i]})
                continue
            result = evaluate(meta, k, self.failed_relation)
            scores.append(float({"score": result.score, "strict": result.strict, "correct": result.correct}[self.reward]))
            details.append({"tag": meta["tag"], "score": result.score, "strict": result.strict,
                            "correct": result.correct, "extra_objects": result.extra_objects,
                            "reason": result.reason})
        return ScoreOutput(scores=np.asarray(scores), details=details)
