"""A reward in a worker process: built once from its recipe entry, then scores batches.

A plain object; the GRPO driver hosts each reward's workers as a Ray actor group and bounds every call
with the reward's timeout (align/trainers/reward_pool.py). It returns the checked `Scores`, per-step scores
(`steps`) included.
"""

from __future__ import annotations

from typing import Any

from rewards.base import Sample, Scores
from rewards.registry import build, score


class RewardWorker:
    def __init__(self, name: str, args: dict[str, Any]):
        self.name = name
        self.reward = build(name, args)

    def score(self, samples: list[Sample]) -> Scores:
        return score(self.name, self.reward, samples)
