"""Two rewards in align's protocol (rewards/base.py): a function and a class built once per worker."""

from __future__ import annotations

from typing import Any


def brevity(samples: list[Any], target_words: int = 20, **_: Any) -> list[float]:
    """1 at or under `target_words` words, falling linearly to 0 at twice that."""
    return [min(1.0, max(0.0, 2 - len(s.completion.split()) / target_words)) for s in samples]


class KeywordReward:
    """Share of the given keywords that appear in the completion; per-sample details for the logs."""

    def __init__(self, keywords: list[str]):
        self.keywords = [k.lower() for k in keywords]

    def __call__(self, samples: list[Any]) -> Any:
        from rewards.base import Scores

        found = [[k for k in self.keywords if k in s.completion.lower()] for s in samples]
        return Scores([len(f) / len(self.keywords) for f in found], [{"found": f} for f in found])
