"""Math rewards: is the completion's final answer the reference answer, and is it in the trained format."""

from __future__ import annotations

import logging
from typing import Any

from rewards.answers import answers_match, extract_final_answer
from rewards.base import Sample

# math-verify warns on every call made with its signal-based timeouts off; ours is the reward worker's.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def equivalent(predicted: str | None, reference: str) -> bool:
    """Exact numeric/string match first; otherwise `math-verify`'s symbolic check (1/2 == 0.5, \\frac{1}{2}).

    math-verify's own timeouts use `signal.alarm`, which raises outside the main thread; they are off here
    and the reward worker's per-call timeout bounds a pathological expression instead."""
    if predicted is None:
        return False
    if answers_match(predicted, reference):
        return True
    from math_verify import parse, verify

    gold, guess = (parse(f"${text}$", parsing_timeout=None) for text in (reference, predicted))
    return bool(gold and guess and verify(gold, guess, timeout_seconds=None))


def math_answer(samples: list[Sample], **_: Any) -> list[float]:
    """1.0 when the final answer (`#### N`, else the last `\\boxed{}`, else the last number) equals
    `row["answer"]`."""
    return [float(equivalent(extract_final_answer(s.completion), str(s.row["answer"]))) for s in samples]


def answer_format(samples: list[Sample], **_: Any) -> list[float]:
    """1.0 when the completion commits to an answer on a `#### N` line, the format the SFT data teaches."""
    return [float("####" in s.completion and extract_final_answer(s.completion) is not None) for s in samples]
