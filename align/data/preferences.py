"""Reward-model data: rows -> token ids of "prompt + response" -> right-padded batches, one stream per rank.

A response is scored as the last assistant turn of the conversation, rendered by the tokenizer's chat
template (`scored_ids`). Training (align/trainers/rm_learner.py) and serving (rewards/reward_model.py) both
call it, so a reward model is always read the way it was trained. Rows:

    pairwise:   {prompt: [messages], chosen: str, rejected: str, margin?: float, category?: str}
    point-wise: {prompt: [messages], completion: str, label: float, category?: str}

Column names come from the recipe (`data.*_key`); a missing or malformed column is a DataError naming
file:line and the column.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from align.config.rm_schema import RMDataConfig
from align.data.chat import check_messages, render_ids
from align.data.sources import DataError, Row, count_rows, iter_rows
from align.data.stream import EpochStream, shuffle_buffered


def scored_ids(tokenizer: Any, prompt: list[dict[str, str]], response: str, max_length: int, origin: str = ""
               ) -> tuple[list[int], bool]:
    """Token ids of the prompt messages followed by `response` as an assistant turn (chat template, end-of-turn
    token included), and whether it was cut. Past `max_length` the LAST max_length tokens are kept: the
    score is read at the final token, and the end of a response (its answer) matters most."""
    ids = render_ids(tokenizer, [*prompt, {"role": "assistant", "content": response}], origin=origin)
    return ids[-max_length:], len(ids) > max_length


@dataclass
class Example:
    sequences: list[list[int]]  # pairwise: [chosen ids, rejected ids]; point-wise: [ids]
    target: float  # pairwise: the margin m (0 when absent); point-wise: the label
    category: str | None
    truncated: int  # sequences of this example that were cut to max_length


@dataclass
class RMBatch:
    input_ids: torch.Tensor  # [N, T] right-padded with pad_id; pairwise: N = 2P, chosen rows first
    attention_mask: torch.Tensor  # [N, T]
    targets: torch.Tensor  # [P] margins (pairwise) or [N] labels (point-wise)
    categories: list[str | None]  # [P] or [N]
    truncated: int

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def parse_example(row: Row, config: RMDataConfig, loss: str, tokenizer: Any) -> Example:
    """Validate one row's columns for `loss` (pairwise, mse, bce) and tokenize its response(s); a DataError
    names file:line and the column."""
    data, origin, pairwise = row.data, row.origin, loss == "pairwise"
    prompt = data.get(config.prompt_key)
    if not isinstance(prompt, list) or not prompt:
        problem = "missing column" if config.prompt_key not in data else "not a non-empty list of messages:"
        raise DataError(f"{origin}: {problem} '{config.prompt_key}' (data.prompt_key)")
    # The scored conversation is the prompt followed by the response as an assistant turn.
    check_messages([*prompt, {"role": "assistant", "content": ""}], origin, config.prompt_key)
    keys = ((config.chosen_key, "chosen_key"), (config.rejected_key, "rejected_key")) if pairwise else (
        (config.completion_key, "completion_key"),)
    sequences, truncated = [], 0
    for key, option_name in keys:
        if not isinstance(data.get(key), str):
            problem = "missing column" if key not in data else "not a string:"
            raise DataError(f"{origin}: {problem} '{key}' (data.{option_name})")
        ids, cut = scored_ids(tokenizer, prompt, data[key], config.max_length, origin)
        sequences.append(ids)
        truncated += cut
    target_key, option_name = (config.margin_key, "margin_key") if pairwise else (config.label_key, "label_key")
    if not pairwise and target_key not in data:
        raise DataError(f"{origin}: missing column '{target_key}' (data.{option_name})")
    target = data.get(target_key, 0.0)
    if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target):
        raise DataError(f"{origin}: column '{target_key}' (data.{option_name}) must be a number, got {target!r}")
    if loss == "bce" and target not in (0, 1):
        raise DataError(f"{origin}: column '{target_key}' (data.{option_name}) must be 0 or 1 for train.loss=bce, "
                        f"got {target!r}")
    category = data.get(config.category_key)
    return Example(sequences, float(target), None if category is None else str(category), truncated)


def collate(examples: list[Example], pad_id: int) -> RMBatch:
    """Right-padded tensors; pairwise rows are ordered [chosen_1..chosen_P, rejected_1..rejected_P]."""
    sequences = [example.sequences[i] for i in range(len(examples[0].sequences)) for example in examples]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return RMBatch(input_ids, attention_mask, torch.tensor([e.target for e in examples]),
                   [e.category for e in examples], sum(e.truncated for e in examples))


class RMStream(EpochStream):
    """Endless micro-batches of one rank's shard (row index mod world size), reshuffled every epoch.
    Deterministic for a given (seed, epoch, rank), so `seek` replays to a saved position."""

    def __init__(self, config: RMDataConfig, loss: str, tokenizer: Any, rank: int, world_size: int,
                 batch_size: int):
        super().__init__(config.train, rank, world_size)
        self.config, self.loss, self.tokenizer, self.batch_size = config, loss, tokenizer, batch_size
        self._start_epoch(0)

    def _epoch_batches(self) -> Iterator[RMBatch]:
        rng = random.Random(f"{self.config.seed}-{self.epoch}-{self.rank}")
        examples: list[Example] = []
        for row in shuffle_buffered(self._shard_rows(), self.config.shuffle_buffer, rng):
            self.rows_read += 1
            examples.append(parse_example(row, self.config, self.loss, self.tokenizer))
            if len(examples) == self.batch_size:
                yield collate(examples, self.tokenizer.pad_token_id)
                examples = []
        if examples:
            yield collate(examples, self.tokenizer.pad_token_id)


def load_examples(path: str, config: RMDataConfig, loss: str, tokenizer: Any, limit: int | None = None
                  ) -> list[Example]:
    """The first `limit` rows of a file, tokenized (held-out sets)."""
    examples = []
    for row in iter_rows(path):
        if limit is not None and len(examples) == limit:
            break
        examples.append(parse_example(row, config, loss, tokenizer))
    return examples


def preflight(config: RMDataConfig, loss: str, tokenizer: Any, rows_per_file: int = 64) -> dict[str, float]:
    """Before any worker starts: parse the first rows of every training file and the whole (limited) held-out
    set, so a wrong column or a broken file fails in seconds; returns row counts and mean tokens."""
    lengths = []
    for path in config.train:
        for i, row in enumerate(iter_rows(path)):
            if i == rows_per_file:
                break
            lengths += [len(ids) for ids in parse_example(row, config, loss, tokenizer).sequences]
    if not lengths:
        raise DataError(f"{', '.join(config.train)}: no rows")
    heldout = load_examples(config.heldout, config, loss, tokenizer, config.heldout_limit) if config.heldout else []
    return {"total_rows": sum(count_rows(p) for p in config.train), "mean_tokens": sum(lengths) / len(lengths),
            "heldout_rows": len(heldout)}
