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

Per-step rewards (process supervision, DeepSeekMath section 4.1.3): `Scores.steps` holds, per sample, the
scored reasoning steps of its completion in order, or None for a sample without steps. A `Step` is its
score and the exclusive end of the step as a character offset into `sample.completion` (the decoded text):
0 < end <= len(completion), ends non-decreasing. `values` stays the outcome score of each sample, so the
same reward also serves outcome supervision. For a completion "2 + 2 = 4\\n#### 4" with answer "4":

    Scores(values=[1.0], steps=[[Step(score=1.0, end=10), Step(score=1.0, end=16)]])

A sample whose steps are None (or empty) takes part in process supervision through its outcome value, as
one step ending at the completion's end. `rewards/math.py:math_steps` is a complete example.
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


@dataclass(frozen=True)
class Step:
    score: float  # the step's reward
    end: int  # exclusive end of the step: a character offset into the sample's completion


@dataclass
class Scores:
    values: list[float | None]  # one per sample: the outcome score
    info: list[dict[str, Any]] | None = None  # optional, one dict per sample, for the logs
    steps: list[list[Step] | None] | None = None  # optional, one list per sample (None: no steps), in order
