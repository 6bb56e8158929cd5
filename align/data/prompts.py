"""Prompt rows for RL: chat prompts rendered with the generation prompt, plus the reference answer.

Prompt sets are small next to SFT corpora, so they are held in memory as token ids; the order is a
seeded permutation per epoch, so step s always draws the same prompts for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from align.data.chat import check_messages, render_ids
from align.data.sources import DataError, Row, iter_rows


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    token_ids: list[int]
    answer: Any
    origin: str  # file:line
    row: dict[str, Any] = field(default_factory=dict)  # the whole data row, for rewards


def load_prompts(paths: list[str], tokenizer: Any, prompt_key: str, answer_key: str, max_length: int,
                 limit: int | None = None, skipped: list[DataError] | None = None) -> list[Prompt]:
    """Every row as a Prompt (at most `limit`). A bad row (malformed line, missing column, prompt too long)
    raises DataError naming file:line, or, given a `skipped` list, is appended to it and left out."""
    prompts = []
    for path in paths:
        for row in iter_rows(path, None if skipped is None else skipped.append):
            try:
                prompts.append(parse_prompt(row, tokenizer, prompt_key, answer_key, max_length))
            except DataError as err:
                if skipped is None:
                    raise
                skipped.append(err)
            if limit and len(prompts) == limit:
                return prompts
    if not prompts:
        raise DataError(f"{', '.join(paths)}: no prompts" + (f" ({len(skipped)} bad rows skipped)" if skipped else ""))
    return prompts


def parse_prompt(row: Row, tokenizer: Any, prompt_key: str, answer_key: str, max_length: int) -> Prompt:
    messages = row.data.get(prompt_key)
    if isinstance(messages, list) and messages and messages[-1].get("role") == "user":
        check_messages([*messages, {"role": "assistant", "content": ""}], row.origin, prompt_key)
    else:
        raise DataError(f"{row.origin}: '{prompt_key}' must be a list of messages ending with a user turn")
    if answer_key not in row.data:
        raise DataError(f"{row.origin}: no '{answer_key}' column")
    ids = render_ids(tokenizer, messages, add_generation_prompt=True, origin=row.origin)
    if len(ids) > max_length:
        raise DataError(f"{row.origin}: prompt is {len(ids)} tokens, over data.max_prompt_length {max_length}")
    return Prompt(messages, ids, row.data[answer_key], row.origin, {**row.data, "answer": row.data[answer_key]})


@dataclass
class PromptSets:
    train: list[Prompt]
    heldout: list[Prompt]
    skipped: list[DataError]  # bad training rows left out (data.skip_bad_rows)


def load_prompt_sets(data: Any, tokenizer: Any) -> PromptSets:
    """A GRPO recipe's training and held-out prompts (`data`: its PromptDataConfig), read and tokenized
    before any worker starts, so that a bad row stops the run at once with its file:line."""
    skipped: list[DataError] = []
    train = load_prompts(data.train, tokenizer, data.prompt_key, data.answer_key, data.max_prompt_length,
                         skipped=skipped if data.skip_bad_rows else None)
    heldout = load_prompts([data.heldout], tokenizer, data.prompt_key, data.answer_key, data.max_prompt_length,
                           data.heldout_limit) if data.heldout else []
    return PromptSets(train, heldout, skipped)


class PromptSampler:
    """Draws prompts without replacement, epoch after epoch, in a seeded order: epoch e is the permutation
    of random.Random(f"{seed}-{e}"), shuffled once and kept until the epoch ends. The state is `position`
    alone (prompts drawn so far), so setting it resumes the exact sequence."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts, self.seed = prompts, seed
        self.position = 0  # prompts drawn so far, over all epochs
        self._epoch, self._order = -1, []  # the permutation of epoch `_epoch`

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.prompts)))
            random.Random(f"{self.seed}-{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order

    def next(self, count: int) -> list[Prompt]:
        drawn = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            drawn.append(self.prompts[self.order(epoch)[index]])
            self.position += 1
        return drawn
