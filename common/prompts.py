"""Prompt sets: plain text, the paper's OCR prompts and GenEval metadata."""
from __future__ import annotations


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
