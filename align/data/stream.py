"""The SFT data stream of one data-parallel rank: read -> shard -> shuffle -> tokenize -> pack -> collate.

Everything is lazy and deterministic for a given (seed, epoch, rank): memory stays constant however
large the data set, and replaying the stream to a saved position reproduces the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from align.config.schema import SFTDataConfig
from align.data.chat import Sample, check_messages, has_targets, tokenize_chat
from align.data.packing import Batch, collate, pack_batches, single_batches
from align.data.sources import DataError, Row, count_rows, iter_rows

T = TypeVar("T")


def shuffle_buffered(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """Streaming shuffle: hold `buffer_size` items, emit a random one as each new item arrives."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class EpochStream:
    """Endless batches from one rank's shard of some files (row index mod world size), epoch after epoch,
    deterministic for a given (seed, epoch, rank) so that `seek` replays to a saved position. Subclasses
    make one epoch's batches in `_epoch_batches`, counting `rows_read` as rows leave the shuffle buffer."""

    epoch: int  # current epoch, set by _start_epoch
    on_bad_row: Callable[[DataError], None] | None = None  # set to skip malformed JSONL lines (else they raise)
    rows_read: int  # rows of this rank's shard consumed (past the shuffle buffer) in the current epoch
    batches_served: int  # batches handed out in the current epoch

    def __init__(self, paths: list[str], rank: int, world_size: int):
        self.paths, self.rank, self.world_size = paths, rank, world_size
        self.total_rows = sum(count_rows(path) for path in paths)
        if self.total_rows < world_size:
            raise DataError(f"{', '.join(paths)}: {self.total_rows} rows cannot feed {world_size} workers")

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional: data position as a number a person can read."""
        return self.epoch + min(1.0, self.rows_read * self.world_size / self.total_rows)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_served": self.batches_served}

    def seek(self, position: dict[str, int]) -> None:
        """Replay the (deterministic) stream up to a saved position."""
        self._start_epoch(position["epoch"])
        for _ in range(position["batches_served"]):
            self.next_batch()

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.rows_read, self.batches_served = epoch, 0, 0
        self._batches = self._epoch_batches()

    def next_batch(self) -> Any:
        for _ in range(2):
            batch = next(self._batches, None)
            if batch is not None:
                self.batches_served += 1
                return batch
            self._start_epoch(self.epoch + 1)
        raise DataError(f"{', '.join(self.paths)}: no trainable samples for rank {self.rank}")

    def _epoch_batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def _shard_rows(self) -> Iterator[Row]:
        index = 0
        for path in self.paths:
            for row in iter_rows(path, self.on_bad_row):
                if index % self.world_size == self.rank:
                    yield row
                index += 1


class SFTStream(EpochStream):
    """Endless batches for one rank; epochs wrap around so every rank always has a next batch."""

    def __init__(self, config: SFTDataConfig, tokenizer: Any, rank: int, world_size: int, rows: int):
        super().__init__(config.train, rank, world_size)
        self.config, self.tokenizer, self.rows = config, tokenizer, rows
        self.counters = {"bad_rows": 0, "truncated": 0, "empty_after_truncation": 0}
        if config.skip_bad_rows:
            self.on_bad_row = self._count_bad_row
        self._start_epoch(0)

    def _count_bad_row(self, _: DataError) -> None:
        self.counters["bad_rows"] += 1

    def _epoch_batches(self) -> Iterator[Batch]:
        rng = random.Random(f"{self.config.seed}-{self.epoch}-{self.rank}")
        shard = shuffle_buffered(self._shard_rows(), self.config.shuffle_buffer, rng)
        samples = (s for s in map(self._tokenize, shard) if s is not None)
        if self.config.packing:
            groups = pack_batches(samples, self.rows, self.config.max_length)
        else:
            groups = single_batches(samples, self.rows)
        pad_id = self.tokenizer.pad_token_id
        return (collate(group, self.rows, pad_id, self.config.packing) for group in groups)

    def _tokenize(self, row: Row) -> Sample | None:
        self.rows_read += 1  # counted as rows leave the shuffle buffer, so progress ignores its prefetch
        try:
            messages = check_messages(row.data.get(self.config.messages_key), row.origin, self.config.messages_key)
            sample = tokenize_chat(self.tokenizer, messages, self.config.max_length, row.origin)
        except DataError:
            if not self.config.skip_bad_rows:
                raise
            self.counters["bad_rows"] += 1
            return None
        self.counters["truncated"] += sample.truncated
        if not has_targets(sample):
            self.counters["empty_after_truncation"] += 1
            return None
        return sample


def preflight(config: SFTDataConfig, tokenizer: Any, rows_per_file: int = 64) -> dict[str, float]:
    """Read and tokenize the first rows of every file before any worker starts, so a wrong column or a
    broken file fails in seconds; returns the mean tokens per sample, used to estimate steps per epoch."""
    lengths = []
    for path in config.train:
        for i, row in enumerate(iter_rows(path, (lambda _: None) if config.skip_bad_rows else None)):
            if i == rows_per_file:
                break
            try:
                messages = check_messages(row.data.get(config.messages_key), row.origin, config.messages_key)
                lengths.append(len(tokenize_chat(tokenizer, messages, config.max_length, row.origin).input_ids))
            except DataError:
                if not config.skip_bad_rows:
                    raise
    if not lengths:
        raise DataError(f"{', '.join(config.train)}: no usable rows")
    return {"mean_tokens": sum(lengths) / len(lengths), "total_rows": sum(count_rows(p) for p in config.train)}
