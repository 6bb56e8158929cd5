"""Rewards by name. A reward scores a batch: `reward(prompts, completions, answers, **args) -> list[float]`.

The plug-in system (entry points, reward workers, timeouts, reward models) is the rewards issue; this is
the minimal registry the GRPO pipeline calls through, so that work changes this module only.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from rewards.answers import answers_match, extract_final_answer

RewardFn = Callable[..., list[float]]


def math_answer(prompts: list[Any], completions: list[str], answers: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion's final answer (`#### N`, boxed, or last number) equals the reference."""
    return [float(answers_match(extract_final_answer(text), str(answer))) for text, answer in zip(completions, answers)]


def answer_format(prompts: list[Any], completions: list[str], answers: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion ends with a `#### N` line, the trained answer format."""
    return [float(extract_final_answer(text) is not None and "####" in text) for text in completions]


REWARDS: dict[str, RewardFn] = {"math_answer": math_answer, "answer_format": answer_format}


def get_reward(name: str) -> RewardFn:
    """A registered name, or `module:attribute` of a callable importable from the current directory or
    the Python path (as `python -m` would find it)."""
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attribute = name.partition(":")
    if not sep:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}, or module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return getattr(importlib.import_module(module), attribute)
