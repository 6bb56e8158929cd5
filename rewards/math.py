"""Math rewards: is the completion's final answer the reference answer, is it in the trained format, and
which of its arithmetic steps are right (per-step scores for process supervision)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from rewards.answers import answers_match, extract_final_answer
from rewards.base import Sample, Scores, Step

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


# `[name:] <integer expression of + - *> = <integer> [word]`, e.g. "bee: 5 * 6 = 30 legs" or "-6 - 62 = -68".
# The expression part is anything up to the `=`; `evaluate` decides whether it is one (no regex backtracking).
_EQUATION = re.compile(r"\s*(?:[A-Za-z][A-Za-z' -]*:)?([^=:]*)=\s*(-?\d{1,100})(?:\s+[A-Za-z]+)?\s*")
_FINAL = re.compile(r"\s*####.*")
_TOKEN = re.compile(r"\s*(\d{1,100}|[-+*])")  # capped: no 4300-digit int() error


def math_steps(samples: list[Sample], **_: Any) -> Scores:
    """Per-step scores of the math-tiny format (lines `67 - 73 = -6`, `bee: 5 * 6 = 30 legs`, `#### -68`).

    Each line `[name:] <integer expression of + - *> = <integer> [word]` is a step scoring 1.0 when the
    arithmetic is right, else 0.0; each `#### N` line is a step scoring 1.0 when N equals `row["answer"]`;
    other lines are not steps. A step ends after its line's newline (or at the completion's end). The
    outcome value is `math_answer`'s; a completion without any step gets steps None."""
    values: list[float | None] = list(math_answer(samples))
    steps: list[list[Step] | None] = []
    for sample in samples:
        found = [Step(score, end) for score, end in _line_scores(sample.completion, str(sample.row["answer"]))]
        steps.append(found or None)
    return Scores(values, steps=steps)


def _line_scores(text: str, reference: str) -> list[tuple[float, int]]:
    """(score, end) of every step line of `text`, in order; end is the offset after the line's newline."""
    scored = []
    start = 0
    for line in text.split("\n"):
        end = min(start + len(line) + 1, len(text))  # past the newline, if there is one
        if _FINAL.fullmatch(line):
            scored.append((float(equivalent(extract_final_answer(line), reference)), end))
        elif (equation := _EQUATION.fullmatch(line)) and (value := evaluate(equation[1])) is not None:
            scored.append((float(value == int(equation[2])), end))
        start += len(line) + 1
    return scored


def evaluate(expression: str) -> int | None:
    """The value of an integer expression of `+`, `-`, `*` (and unary minus) with the usual precedence,
    or None if it is not one or has no binary operator (`5` alone is no arithmetic). No `eval`:

        expression := term (("+" | "-") term)*     term := factor ("*" factor)*     factor := "-"* integer
    """
    tokens = _TOKEN.findall(expression)
    if "".join(tokens) != re.sub(r"\s+", "", expression):  # a character the tokens do not cover
        return None
    position = 0
    binary = 0

    def factor() -> int | None:
        nonlocal position
        sign = 1
        while position < len(tokens) and tokens[position] == "-":
            sign, position = -sign, position + 1
        if position == len(tokens) or not tokens[position].isdigit():
            return None
        position += 1
        return sign * int(tokens[position - 1])

    def chain(operand: Callable[[], int | None], operators: str) -> int | None:
        nonlocal position, binary
        total = operand()
        while total is not None and position < len(tokens) and tokens[position] in operators:
            operator, position, binary = tokens[position], position + 1, binary + 1
            right = operand()
            if right is None:
                return None
            total = total * right if operator == "*" else total + right if operator == "+" else total - right
        return total

    value = chain(lambda: chain(factor, "*"), "+-")
    return value if value is not None and position == len(tokens) and binary > 0 else None
