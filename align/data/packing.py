"""Packing samples into fixed-width rows without letting them attend to each other.

Each row holds several samples back to back; `position_ids` restart at 0 at every sample, which is how
transformers (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask when no
attention mask is given. Rows stay `max_length` wide instead of being flattened into one long row (TRL's
padding-free mode): attention cost grows with the square of the row width, so narrow rows are cheaper.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from align.data.chat import IGNORE_INDEX, Sample


@dataclass
class PackedRow:
    samples: list[Sample] = field(default_factory=list)
    length: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, width]
    labels: torch.Tensor  # [rows, width], IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [rows, width], restart at 0 per sample
    segment_ids: torch.Tensor  # [rows, width], sample index within the batch, -1 on padding
    attention_mask: torch.Tensor | None  # [rows, width]; None when packed (positions carry the mask)
    num_samples: int

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def pack_batches(samples: Iterable[Sample], rows: int, max_length: int) -> Iterator[list[PackedRow]]:
    """Online first-fit packing into `2 * rows` open rows; when a sample fits none, the `rows` fullest
    rows leave as one batch. Deterministic for a given sample order (exact resume relies on this)."""
    open_rows: list[PackedRow] = []
    for sample in samples:
        size = len(sample.input_ids)
        target = next((row for row in open_rows if row.length + size <= max_length), None)
        if target is None:
            if len(open_rows) >= 2 * rows:
                open_rows.sort(key=lambda row: -row.length)
                yield open_rows[:rows]
                open_rows = open_rows[rows:]
            target = PackedRow()
            open_rows.append(target)
        target.samples.append(sample)
        target.length += size
    open_rows.sort(key=lambda row: -row.length)
    for start in range(0, len(open_rows), rows):
        yield open_rows[start : start + rows]


def single_batches(samples: Iterable[Sample], rows: int) -> Iterator[list[PackedRow]]:
    """One sample per row (packing off)."""
    batch: list[PackedRow] = []
    for sample in samples:
        batch.append(PackedRow([sample], len(sample.input_ids)))
        if len(batch) == rows:
            yield batch
            batch = []
    if batch:
        yield batch


def collate(batch_rows: list[PackedRow], rows: int, pad_id: int, packed: bool) -> Batch:
    """Rows -> padded tensors, width = the longest row. Missing rows (end of data) are all padding."""
    width = max(1, max((row.length for row in batch_rows), default=1))
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segment_ids = torch.full((rows, width), -1, dtype=torch.long)
    segment = 0
    for r, row in enumerate(batch_rows):
        offset = 0
        for sample in row.samples:
            n = len(sample.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(sample.input_ids)
            labels[r, offset : offset + n] = torch.tensor(sample.labels)
            position_ids[r, offset : offset + n] = torch.arange(n)
            segment_ids[r, offset : offset + n] = segment
            segment += 1
            offset += n
        # Padding positions restart at 0, so padding forms its own (ignored) block and never joins a sample.
        position_ids[r, offset:] = torch.arange(width - offset)
    attention_mask = None if packed else (segment_ids >= 0).long()
    return Batch(input_ids, labels, position_ids, segment_ids, attention_mask, num_samples=segment)
