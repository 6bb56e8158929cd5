"""The reward protocol every built-in and third-party reward follows.

A reward scores a batch of samples and returns one value per sample:

    def my_reward(samples: list[Sample], **args) -> list[float | None] | Scores: ...

- `samples[i].prompt` is the chat prompt (messages), `.completion` the generated text, `.num_tokens` its
  length in tokens, `.row` the prompt's whole data row (unit tests, any metadata column); `row["answer"]`
  always holds the column the recipe names as the reference answer (`data.answer_key`).
- A value of None means "no score for this sample": the sample is kept out of the loss, like a failed call.
- Return `Scores` to add per-sample details for the logs (`info`).
- It may be `async def`. A class works too: the reward worker builds it once with the recipe's `args`
  (load a model there) and then calls the instance with the samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    prompt: list[dict[str, str]]  # chat messages ending with the user turn
    completion: str
    row: dict[str, Any] = field(default_factory=dict)  # the prompt's data row
    num_tokens: int = 0  # completion length in tokens


@dataclass
class Scores:
    values: list[float | None]  # one per sample
    info: list[dict[str, Any]] | None = None  # optional, one dict per sample, for the logs
