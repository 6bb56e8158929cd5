"""A reward with a dense signal even for an untrained model, for pipeline tests: the share of digits."""

from __future__ import annotations

from typing import Any


def digit_fraction(prompts: list[Any], completions: list[str], answers: list[Any], **_: Any) -> list[float]:
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def odd_answers_only(prompts: list[Any], completions: list[str], answers: list[Any], **_: Any) -> list[float]:
    """Groups of even-answer prompts all score 0 (no GRPO signal); odd ones score the parity of the text's
    length (varies within a group). Makes dynamic sampling drop and refill groups by prompt."""
    return [0.0 if int(answer) % 2 == 0 else float(len(text) % 2) for text, answer in zip(completions, answers)]
