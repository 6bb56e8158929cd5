"""Streaming readers for JSONL, Parquet and HF dataset directories.

Rows are read lazily, one at a time, so 1.5M-row sets train in constant memory. Every row carries its
origin (`file:line` for JSONL, `file:row N` otherwise) so a bad row is reported where a person can find it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A malformed data row or file, named by file and line."""


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    origin: str  # "path:line" (1-based), for error messages


def count_rows(path: str | Path) -> int:
    """Number of rows in a data source without parsing them (newline count for JSONL)."""
    path = Path(path)
    if path.is_dir():
        import datasets

        return len(datasets.load_from_disk(str(path)))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def iter_rows(path: str | Path, on_bad: Callable[[DataError], None] | None = None) -> Iterator[Row]:
    """Yield the rows of one source. A JSONL line that is not a JSON object raises DataError naming
    file:line, or, with `on_bad`, is passed to it as that error and skipped."""
    path = Path(path)
    if path.is_dir():
        yield from _iter_hf_dataset(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _iter_jsonl(path, on_bad)
    else:
        raise DataError(f"{path}: unsupported data format (use .jsonl, .parquet or an HF dataset directory)")


def _iter_jsonl(path: Path, on_bad: Callable[[DataError], None] | None) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                data = json.loads(line)
                error = None if isinstance(data, dict) else f"expected a JSON object, got {type(data).__name__}"
            except json.JSONDecodeError as err:
                error = f"invalid JSON ({err.msg} at column {err.colno})"
            if error is None:
                yield Row(data, origin)
            elif on_bad is None:
                raise DataError(f"{origin}: {error}")
            else:
                on_bad(DataError(f"{origin}: {error}"))


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            number += 1
            yield Row(data, f"{path}:row {number}")


def _iter_hf_dataset(path: Path) -> Iterator[Row]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path}: is a DatasetDict; name one split directory instead")
    for number, data in enumerate(dataset, start=1):
        yield Row(data, f"{path}:row {number}")
