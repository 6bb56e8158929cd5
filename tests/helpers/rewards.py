"""Rewards for pipeline tests (the align reward protocol, rewards/base.py)."""

from __future__ import annotations

import os
import time
from typing import Any

from rewards.base import Sample, Scores, Step


def digit_fraction(samples: list[Sample], **_: Any) -> list[float]:
    """The share of digits: a dense signal even for an untrained model."""
    return [sum(ch.isdigit() for ch in s.completion) / max(1, len(s.completion)) for s in samples]


def odd_answers_only(samples: list[Sample], **_: Any) -> list[float]:
    """Groups of even-answer prompts all score 0 (no GRPO signal); odd ones score the parity of the text's
    length (varies within a group). Makes dynamic sampling drop and refill groups by prompt."""
    return [0.0 if int(s.row["answer"]) % 2 == 0 else float(len(s.completion) % 2) for s in samples]


def flaky(samples: list[Sample], mode: str = "raise", every: int = 1, **_: Any) -> list[Any]:
    """Misbehaves on every `every`-th call of its process (a per-process counter): raise, hang, return
    NaN, the wrong count, or kill its own process. Otherwise scores like digit_fraction."""
    flaky.calls = getattr(flaky, "calls", 0) + 1
    if flaky.calls % every == 0:
        if mode == "raise":
            raise ValueError("flaky reward failed on purpose")
        if mode == "hang":
            time.sleep(3600)
        if mode == "nan":
            return [float("nan")] * len(samples)
        if mode == "count":
            return [0.0]
        if mode == "die":
            os._exit(1)
    return digit_fraction(samples)


def digit_steps(samples: list[Sample], every: int = 4, **_: Any) -> Scores:
    """Process supervision with a dense signal for an untrained model: a step every `every` characters, scoring
    its share of digits; the outcome value is the completion's digit share (digit_fraction)."""
    steps = []
    for s in samples:
        text = s.completion
        ends = list(range(every, len(text), every)) + [len(text)] if text else []
        starts = [0] + ends[:-1]
        steps.append([Step(sum(ch.isdigit() for ch in text[a:b]) / (b - a), b) for a, b in zip(starts, ends)] or None)
    return Scores(digit_fraction(samples), steps=steps)
