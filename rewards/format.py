"""Format and length rewards: does the completion have the required structure, is it too long."""

from __future__ import annotations

import re
from typing import Any

import torch

from align.rl.advantages import overlong_penalty
from rewards.base import Sample

THINK_ANSWER = r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*"


def format_match(samples: list[Sample], pattern: str = THINK_ANSWER, **_: Any) -> list[float]:
    """1.0 when the whole completion matches `pattern` (a Python regex, `.` spanning lines); the default
    asks for reasoning in <think> tags followed by <answer> tags (the DeepSeek-R1 format)."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(s.completion) is not None) for s in samples]


def soft_overlong(samples: list[Sample], max_tokens: int, cache_tokens: int = 0, **_: Any) -> list[float]:
    """DAPO's length shaping (align/rl/advantages.py: overlong_penalty): 0 up to max_tokens - cache_tokens,
    then a linear ramp to -1 at max_tokens. Weight it beside a task reward."""
    lengths = torch.tensor([s.num_tokens for s in samples])
    return overlong_penalty(lengths, max_tokens, cache_tokens).tolist()
