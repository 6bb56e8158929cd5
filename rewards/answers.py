"""Final-answer extraction for math completions (pure string functions)."""

from __future__ import annotations

import re

_HASHES = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def extract_final_answer(text: str) -> str | None:
    """The answer a completion commits to: the last `#### N`, else the last `\\boxed{...}`, else the
    last number in the text. Thousands separators are dropped ("1,200" -> "1200")."""
    found = _HASHES.findall(text) or boxed_contents(text)
    if found:
        return _normalise(found[-1])
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}`, nested braces included (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`)."""
    contents = []
    for start in (m.end() for m in re.finditer(r"\\boxed\{", text)):
        depth = 1
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                contents.append(text[start:end])
                break
    return contents


def _normalise(answer: str) -> str:
    answer = answer.strip().replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", answer):
        answer = answer.split(".")[0]
    return answer


def answers_match(predicted: str | None, reference: str) -> bool:
    """Exact match after normalisation; numbers compare by value (so "7.0" equals "7")."""
    if predicted is None:
        return False
    reference = _normalise(reference)
    try:
        return float(predicted) == float(reference)
    except ValueError:
        return predicted == reference
