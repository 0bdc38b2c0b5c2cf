"""The OCR reward of Flow-GRPO, with the OCR engine behind a small interface.

The reward is the paper's, exactly. The target is the text between the prompt's first
pair of double quotes (`extract_target`, shared with the prompt loader). The text read
is every text box (rapidocr, PaddleOCR) or word (tesseract) whose confidence is at
least reward.ocr.min_confidence, joined without separator: the paper ran PaddleOCR 2.x,
whose `ocr()` drops boxes scoring below its drop_score of 0.5 before anything else
(its code then keeps boxes scoring above 0, which the floor already implies). Spaces
are removed and both texts lower-cased; then

    reward = 1                                          if target is contained in the text read
    reward = 1 - min(lev(read, target), len(target)) / len(target)     otherwise

with lev the Levenshtein distance (rapidfuzz). Nothing read gives lev = len(target), so
0, counted as "empty". An engine error is not a reading: the call raises
(OcrEngineError), so the reward worker retries it and then drops the images' groups
and counts them (the paper scored it 0, which GRPO would learn from). A prompt without
a quoted target cannot be scored: the image gets NaN and its group is dropped (the
prompt loader rejects such prompts first).

Engines (`reward.ocr.engine`), each run without a floor of its own:

    rapidocr   default: PP-OCR ONNX models carried inside the rapidocr wheel, run by
               onnxruntime (CPU, or onnxruntime-gpu with reward.ocr.use_gpu); offline.
    paddleocr  PaddleOCR 3.x with the paper's models (PP-OCRv4 English, no angle
               classifier), or exported models from reward.ocr.det_model_dir /
               rec_model_dir. It wants its own environment: run it behind
               `flowgrpo serve-reward --scorer ocr` and point reward.endpoints.ocr at it.
    tesseract  pytesseract with --psm 7 (one text line), needs the tesseract binary;
               its word confidences (0-100) are divided by 100.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import version
from typing import Literal

import numpy as np
from rapidfuzz.distance import Levenshtein

from common.config import OcrConfig, RewardConfig
from common.prompts import extract_ocr_target as extract_target
from services.reward.base import ScoreOutput, Scorer, ScorerNeeds

__all__ = ["extract_target", "ocr_reward", "read_text", "OcrEngine", "OcrEngineError", "RapidOcrEngine",
           "PaddleOcrEngine", "TesseractEngine", "OcrScorer", "make_engine"]


def ocr_reward(recognized: str, target: str) -> float:
    """The paper's OCR reward of the text read against the target (see module doc)."""
    read = recognized.replace(" ", "").lower()
    goal = target.replace(" ", "").lower()
    if not goal:
        raise ValueError(f"OCR target {target!r} is empty once spaces are removed")
    if goal in read:
        return 1.0
    return 1.0 - min(Levenshtein.distance(read, goal), len(goal)) / len(goal)


def _missing(extra: str, package: str, err: ImportError) -> ImportError:
    return ImportError(f"reward.ocr.engine {extra!r} needs {package}: pip install 'flowgrpo-ray[{extra}]' "
                       f"(or run the OCR scorer behind `flowgrpo serve-reward --scorer ocr` in an "
                       f"environment that has it) [{err}]")


def read_text(lines: list[tuple[str, float]], min_confidence: float) -> str:
    """The text read: the pieces whose confidence is at least `min_confidence`, joined
    without separator (PaddleOCR's drop_score rule, module doc)."""
    return "".join(text for text, confidence in lines if confidence >= min_confidence)


class OcrEngineError(RuntimeError):
    """The OCR engine failed on an image: a scorer failure, not a reading of nothing."""


class OcrEngine(ABC):
    """Reads text pieces with their confidences from one image. `channel_order` is the
    order the engine's own API takes; `lines` hands the RGB image over in that order."""

    name: str
    channel_order: Literal["RGB", "BGR"]

    def lines(self, image: np.ndarray) -> list[tuple[str, float]]:
        """(text, confidence in [0, 1]) for each box or word found, in reading order."""
        if self.channel_order == "BGR":
            image = np.ascontiguousarray(image[:, :, ::-1])
        return self._read(image)

    @abstractmethod
    def _read(self, image: np.ndarray) -> list[tuple[str, float]]:
        """`lines` on an image already in `channel_order`."""


class RapidOcrEngine(OcrEngine):
    """rapidocr with onnxruntime named explicitly as its inference engine. A numpy image
    given to rapidocr is taken as BGR (OpenCV's order). The angle classifier is off, as
    in the paper's use of PaddleOCR, and rapidocr's own floor (Global.text_score) is 0:
    the scorer applies reward.ocr.min_confidence to every engine alike."""

    channel_order = "BGR"

    def __init__(self, use_gpu: bool = False):
        try:
            import onnxruntime
            from rapidocr import EngineType, RapidOCR
        except ImportError as err:
            raise _missing("ocr", "rapidocr and onnxruntime", err) from None
        self._ocr = RapidOCR(params={
            "Global.use_cls": False,
            "Global.text_score": 0.0,
            "Global.log_level": "error",
            "Det.engine_type": EngineType.ONNXRUNTIME,
            "Rec.engine_type": EngineType.ONNXRUNTIME,
            "EngineConfig.onnxruntime.use_cuda": use_gpu,
        })
        device = "cuda" if use_gpu else "cpu"
        self.name = f"rapidocr-{version('rapidocr')}-onnxruntime-{onnxruntime.__version__}-{device}"

    def _read(self, image):
        result = self._ocr(image)
        return list(zip(result.txts or (), result.scores or ()))


class PaddleOcrEngine(OcrEngine):
    """PaddleOCR 3.x, configured as the paper's PaddleOCR(lang="en", use_angle_cls=False):
    PP-OCRv4 detection and English recognition, no document preprocessing. With
    det_model_dir and rec_model_dir the models are read from those directories
    (PaddleOCR's exported inference format for PP-OCRv4_mobile_det and
    en_PP-OCRv4_mobile_rec; config validation checks they come together) instead of
    PaddleOCR's download cache. PaddleOCR 3.x keeps every box (text_rec_score_thresh 0);
    the scorer applies the floor that 2.x's drop_score applied. PaddleOCR takes numpy
    images as BGR; the paper's code handed it RGB arrays, we give it the order it expects."""

    channel_order = "BGR"
    DET_MODEL = "PP-OCRv4_mobile_det"
    REC_MODEL = "en_PP-OCRv4_mobile_rec"

    def __init__(self, config: OcrConfig):
        try:
            import paddleocr
        except ImportError as err:
            raise _missing("paddleocr", "paddleocr and paddlepaddle", err) from None
        if config.det_model_dir is None:
            models = dict(lang="en", ocr_version="PP-OCRv4")
        else:
            models = dict(text_detection_model_name=self.DET_MODEL, text_detection_model_dir=config.det_model_dir,
                          text_recognition_model_name=self.REC_MODEL, text_recognition_model_dir=config.rec_model_dir)
        device = "gpu" if config.use_gpu else "cpu"
        self._ocr = paddleocr.PaddleOCR(use_doc_orientation_classify=False, use_doc_unwarping=False,
                                        use_textline_orientation=False, device=device, **models)
        self.name = f"paddleocr-{version('paddleocr')}-ppocrv4-{device}"

    def _read(self, image):
        result = self._ocr.predict(image)[0]
        return [(text, float(score)) for text, score in zip(result["rec_texts"], result["rec_scores"])]


class TesseractEngine(OcrEngine):
    """Tesseract through pytesseract, page segmentation mode 7 (a single text line);
    mode 8 reads rendered words badly. Given a PIL image, which pytesseract takes as RGB.
    Pieces are words with their confidence (image_to_data's conf / 100; entries with
    conf -1 are layout levels, not words)."""

    channel_order = "RGB"
    CONFIG = "--psm 7"

    def __init__(self):
        try:
            import pytesseract
        except ImportError as err:
            raise _missing("tesseract", "pytesseract", err) from None
        try:
            version = pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError:
            raise RuntimeError("reward.ocr.engine 'tesseract' needs the tesseract binary on PATH: "
                               "apt-get install tesseract-ocr tesseract-ocr-eng") from None
        self._tesseract = pytesseract
        self.name = f"tesseract-{version}-psm7"

    def _read(self, image):
        from PIL import Image
        data = self._tesseract.image_to_data(Image.fromarray(image), config=self.CONFIG,
                                             output_type=self._tesseract.Output.DICT)
        return [(text, float(conf) / 100) for text, conf in zip(data["text"], data["conf"])
                if float(conf) >= 0 and text.strip()]


def make_engine(config: OcrConfig) -> OcrEngine:
    if config.engine == "rapidocr":
        return RapidOcrEngine(use_gpu=config.use_gpu)
    if config.engine == "paddleocr":
        return PaddleOcrEngine(config)
    if config.engine == "tesseract":
        return TesseractEngine()
    raise ValueError(f"reward.ocr.engine: unknown engine {config.engine!r}; use rapidocr, paddleocr or tesseract")


class OcrScorer(Scorer):
    """OCR reward for each image against its prompt's quoted target (module doc).
    `engine` may be given to use an already built OcrEngine. Details: the `text` read
    (after the confidence floor) and the `target`."""

    name = "ocr"

    def __init__(self, config: RewardConfig, engine: OcrEngine | None = None):
        self._engine = engine if engine is not None else make_engine(config.ocr)
        self.engine = self._engine.name
        self.min_confidence = config.ocr.min_confidence

    @classmethod
    def needs(cls, config: RewardConfig) -> ScorerNeeds:
        ocr = config.ocr
        pip = {
            "rapidocr": ["rapidocr>=3.4", "onnxruntime-gpu>=1.20" if ocr.use_gpu else "onnxruntime>=1.20"],
            "paddleocr": ["paddleocr>=3.0", "paddlepaddle-gpu>=3.0" if ocr.use_gpu else "paddlepaddle>=3.0"],
            "tesseract": ["pytesseract>=0.3.10"],
        }[ocr.engine]
        gpus = config.num_gpus if ocr.use_gpu and ocr.engine != "tesseract" else 0.0
        return ScorerNeeds(num_gpus=gpus, num_cpus=config.num_cpus, pip=pip)

    def _score(self, images, prompts, metadata):
        scores, details = [], []
        counts = {"empty": 0}
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            try:
                target = extract_target(prompt)
            except ValueError as err:
                scores.append(float("nan"))
                details.append({"error": str(err)})
                continue
            try:
                text = read_text(self._engine.lines(image), self.min_confidence)
            except Exception as err:
                raise OcrEngineError(f"{self.engine} failed on image {i} of the call: "
                                     f"{type(err).__name__}: {err}") from err
            if not text.strip():
                counts["empty"] += 1
            scores.append(ocr_reward(text, target))
            details.append({"target": target, "text": text})
        return ScoreOutput(scores=np.asarray(scores), details=details, counts=counts)
