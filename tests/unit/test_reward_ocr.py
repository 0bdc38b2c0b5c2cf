"""The OCR reward: the paper's formula on hand cases, and rapidocr reading words
rendered with DejaVuSans (offline: its PP-OCR models ship inside the wheel)."""
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from common.config import OcrConfig, RewardConfig
from services.reward import ocr
from services.reward.ocr import OcrEngine, OcrEngineError, OcrScorer, PaddleOcrEngine, TesseractEngine, ocr_reward

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def render(text: str) -> np.ndarray:
    """Black words on white, 512 px square: rapidocr scales the short side to 736 px,
    so a square image of rollout size is both realistic and the cheapest to read."""
    image = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(image).text((32, 230), text, fill="black", font=ImageFont.truetype(FONT, 44))
    return np.asarray(image)


@pytest.mark.parametrize("read, target, reward", [
    ("Hello World", "Hello World", 1.0),
    ("the sign says hello world!!", "Hello World", 1.0),   # contained
    ("HELLOWORLD", "hello world", 1.0),                    # spaces and case do not count
    ("Helo World", "Hello World", 1 - 1 / 10),
    ("abd", "abc", 1 - 1 / 3),
    ("Coffee", "Coffee Shop", 1 - 4 / 10),
    ("", "abc", 0.0),                                      # nothing read
    ("xyzxyzxyzxyz", "abc", 0.0),                          # distance capped at len(target)
])
def test_formula(read, target, reward):
    assert ocr_reward(read, target) == pytest.approx(reward)


def test_empty_target_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ocr_reward("abc", "  ")


def test_the_target_is_the_first_quoted_text():
    assert ocr.extract_target('A sign "Open Late" and "Closed"') == "Open Late"


@pytest.fixture(scope="module")
def scorer():
    return OcrScorer(RewardConfig(weights={"ocr": 1.0}))


def test_rendered_words_read_back_score_one(scorer):
    words = ["Hello World", "Forever Yours", "NASA 2049"]
    out = scorer.score([render(w) for w in words], [f'A sign that says "{w}"' for w in words], [{}] * 3)
    assert out.scores.tolist() == [1.0, 1.0, 1.0], out.details
    assert scorer.engine.startswith("rapidocr-") and "onnxruntime" in scorer.engine


def test_misspelt_rendering_scores_less(scorer):
    out = scorer.score([render("Helo Wrld")], ['A poster reading "Hello World"'], [{}])
    assert 0.5 <= out.scores[0] < 1.0
    assert out.scores[0] == ocr_reward(out.details[0]["text"], "Hello World")


def test_blank_image_scores_zero_and_is_counted(scorer):
    out = scorer.score([np.full((512, 512, 3), 255, np.uint8)], ['A sign that says "Open"'], [{}])
    assert out.scores.tolist() == [0.0]
    assert out.counts["empty"] == 1


def test_pil_images_are_accepted(scorer):
    out = scorer.score([Image.fromarray(render("Open"))], ['"Open"'], [{}])
    assert out.scores.tolist() == [1.0]


def test_rapidocr_is_given_bgr_and_reports_every_box():
    seen = []

    class Fake:
        def __call__(self, image):
            seen.append(image)
            return type("Result", (), {"txts": ("ok", "faint"), "scores": (0.9, 0.1)})()

    engine = ocr.RapidOcrEngine()
    engine._ocr = Fake()
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # red
    assert engine.lines(rgb) == [("ok", 0.9), ("faint", 0.1)]
    assert seen[0][0, 0].tolist() == [0, 0, 255]


def test_rapidocr_applies_no_floor_of_its_own():
    assert ocr.RapidOcrEngine()._ocr.text_score == 0.0


class Lines(OcrEngine):
    """An engine that reads given pieces, whatever the image."""
    name = "lines"
    channel_order = "RGB"

    def __init__(self, lines):
        self.pieces = lines

    def _read(self, image):
        return self.pieces


PIECES = [("Hello", 0.93), ("Wor", 0.49), ("ld", 0.5)]


@pytest.mark.parametrize("order, pixel", [("RGB", [255, 0, 0]), ("BGR", [0, 0, 255])])
def test_an_engine_is_handed_the_channel_order_it_declares(order, pixel):
    seen = []

    class Capture(Lines):
        channel_order = order

        def _read(self, image):
            seen.append(image)
            return []

    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    Capture([]).lines(red)
    assert seen[0][0, 0].tolist() == pixel


def test_boxes_below_the_confidence_floor_are_dropped_before_joining():
    scorer = OcrScorer(RewardConfig(), engine=Lines(PIECES))
    out = scorer.score([render("x")], ['a sign "Hello World"'], [{}])
    assert out.details == [{"target": "Hello World", "text": "Hellold"}]  # 0.49 dropped, 0.5 kept (>= floor)
    assert out.scores[0] == pytest.approx(ocr_reward("Hellold", "Hello World"))


def test_the_floor_is_configurable():
    scorer = OcrScorer(RewardConfig(ocr=OcrConfig(min_confidence=0.0)), engine=Lines(PIECES))
    out = scorer.score([render("x")], ['a sign "Hello World"'], [{}])
    assert out.details[0]["text"] == "HelloWorld" and out.scores.tolist() == [1.0]


def test_tesseract_words_carry_their_confidence():
    engine = object.__new__(TesseractEngine)
    data = {"text": ["", "Hello", "World", " "], "conf": [-1, 96.5, "41", -1]}
    engine._tesseract = type("FakeTesseract", (), {
        "Output": type("Output", (), {"DICT": "dict"}),
        "image_to_data": staticmethod(lambda image, config, output_type: data)})
    assert engine.lines(np.zeros((4, 4, 3), np.uint8)) == [("Hello", 0.965), ("World", 0.41)]


class Broken(OcrEngine):
    name = "broken"
    channel_order = "RGB"

    def _read(self, image):
        raise RuntimeError("engine crashed")


def test_an_engine_error_fails_the_call_instead_of_scoring_zero():
    scorer = OcrScorer(RewardConfig(), engine=Broken())
    with pytest.raises(OcrEngineError, match="broken failed on image 1 of the call: RuntimeError: engine crashed"):
        scorer.score([render("x")] * 2, ['no quotes here', '"Open"'], [{}] * 2)


def test_prompt_without_target_gives_nan_with_the_reason():
    scorer = OcrScorer(RewardConfig(), engine=Broken())
    out = scorer.score([render("Open")], ["a sign with no quotes"], [{}])
    assert np.isnan(out.scores[0])
    assert "double quotes" in out.details[0]["error"]


@pytest.mark.parametrize("module, build, extra", [
    ("paddleocr", lambda: PaddleOcrEngine(OcrConfig(engine="paddleocr")), "paddleocr"),
    ("pytesseract", TesseractEngine, "tesseract"),
])
def test_missing_optional_engine_names_the_extra(monkeypatch, module, build, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"flowgrpo-ray\[{extra}\]"):
        build()
