"""Rewards by name: the built-ins, third-party plug-ins, or a `module:attribute` path.

A plug-in package registers its rewards under the entry-point group `align.rewards` in its
pyproject.toml, and a recipe then names them like built-ins:

    [project.entry-points."align.rewards"]
    toxicity = "my_package.rewards:toxicity"

`tests/plugin_example/` is a complete example package (installed and used by tests/test_rewards.py).
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from rewards.base import Sample, Scores, Step

ENTRY_POINT_GROUP = "align.rewards"
BUILTINS = {
    "math_answer": "rewards.math:math_answer",
    "answer_format": "rewards.math:answer_format",
    "math_steps": "rewards.math:math_steps",
    "format_match": "rewards.format:format_match",
    "soft_overlong": "rewards.format:soft_overlong",
    "code_execution": "rewards.code:code_execution",
    "reward_model": "rewards.reward_model:RewardModel",
}


class RewardError(RuntimeError):
    """A reward broke its contract (raised, wrong count, wrong type); the message names it."""


def available() -> dict[str, str]:
    """Every name a recipe can use without a module path: built-ins, then installed plug-ins."""
    names = dict(BUILTINS)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(entry.name, entry.value)
    return names


def resolve(name: str) -> Any:
    """The function or class a reward name stands for."""
    target = available().get(name)
    if target is None:
        if ":" not in name:
            close = difflib.get_close_matches(name, available(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown reward {name!r}{hint}; known: {', '.join(sorted(available()))}, "
                           f"a plug-in in entry-point group {ENTRY_POINT_GROUP!r}, or module:attribute")
        target = name
    module, _, attribute = target.partition(":")
    if os.getcwd() not in sys.path:  # `module:attribute` resolves from the current directory, as `python -m`
        sys.path.append(os.getcwd())
    return getattr(importlib.import_module(module), attribute)


def build(name: str, args: dict[str, Any]) -> Callable[[list[Sample]], Any]:
    """A ready-to-call reward: a class is instantiated once with `args`, a function gets them bound."""
    target = resolve(name)
    if inspect.isclass(target):
        return target(**args)
    return functools.partial(target, **args)


def score(name: str, reward: Callable[[list[Sample]], Any], samples: list[Sample]) -> Scores:
    """Call a reward and check what it returned: one value per sample, each a finite float or None.
    NaN/inf become None (the sample then gets the recipe's fallback) and are flagged in `info`.
    Per-step scores, if any, must be one list (or None) per sample of `Step`s with finite scores and
    non-decreasing ends in (0, len(completion)]; anything else raises `RewardError`."""
    result = reward(samples)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    scores = result if isinstance(result, Scores) else Scores(list(result) if result is not None else [])
    if len(scores.values) != len(samples):
        raise RewardError(f"reward {name!r} returned {len(scores.values)} values for {len(samples)} samples")
    info = scores.info or [{} for _ in samples]
    values: list[float | None] = []
    for i, value in enumerate(scores.values):
        if value is not None and not isinstance(value, (int, float)):
            raise RewardError(f"reward {name!r} returned {type(value).__name__} for sample {i}, not a float")
        if value is not None and not math.isfinite(value):
            info[i] = {**info[i], "invalid": repr(value)}
            value = None
        values.append(None if value is None else float(value))
    return Scores(values, info, _checked_steps(name, scores.steps, samples))


def _checked_steps(name: str, steps: Any, samples: list[Sample]) -> list[list[Step] | None] | None:
    """`steps` as given, after checking it against the protocol in rewards/base.py."""
    if steps is None:
        return None
    if len(steps) != len(samples):
        raise RewardError(f"reward {name!r} returned {len(steps)} step lists for {len(samples)} samples")
    checked: list[list[Step] | None] = []
    for i, (sample_steps, sample) in enumerate(zip(steps, samples)):
        if sample_steps is None:
            checked.append(None)
            continue
        previous = 0
        for j, step in enumerate(sample_steps):
            if not isinstance(step, Step):
                raise RewardError(f"reward {name!r} returned {type(step).__name__} as step {j} of sample {i}, "
                                  "not a Step")
            if not isinstance(step.score, (int, float)) or not math.isfinite(step.score):
                raise RewardError(f"reward {name!r} returned score {step.score!r} for step {j} of sample {i}, "
                                  "not a finite float")
            if not isinstance(step.end, int) or not 0 < step.end <= len(sample.completion):
                raise RewardError(f"reward {name!r} returned end {step.end!r} for step {j} of sample {i}, "
                                  f"outside (0, {len(sample.completion)}] (the completion's characters)")
            if step.end < previous:
                raise RewardError(f"reward {name!r} returned end {step.end} for step {j} of sample {i}, "
                                  f"before the previous step's end {previous}")
            previous = step.end
        checked.append([Step(float(step.score), step.end) for step in sample_steps])
    return checked


async def _await(awaitable: Any) -> Any:
    return await awaitable
