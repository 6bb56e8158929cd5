"""A reward with a dense signal even for an untrained model, for pipeline tests: the share of digits."""

from __future__ import annotations

from typing import Any


def digit_fraction(prompts: list[Any], completions: list[str], answers: list[Any], **_: Any) -> list[float]:
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]
