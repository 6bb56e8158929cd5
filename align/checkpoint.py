"""Atomic checkpoint directories: write into a hidden staging directory, then rename into place.

A rename within one file system is atomic, so a run killed mid-write leaves the previous checkpoint
whole and a `.tmp-*` directory that the next start removes. Multi-node runs need a shared file system
for the run directory (every rank writes its own DeepSpeed shard into the staging directory).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")


def staging_dir(root: Path, name: str) -> Path:
    """A fresh, empty staging directory beside the final one (same file system, so rename is atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def commit(staging: Path, final: Path) -> Path:
    """Move a finished staging directory into place, replacing an older directory of the same name."""
    _fsync_tree(staging)
    if final.exists():
        retired = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(final.parent)
    return final


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def clean_staging(root: Path) -> list[Path]:
    """Remove leftovers of interrupted writes; returns what was removed."""
    if not root.is_dir():
        return []
    removed = [*root.glob(".tmp-*"), *root.glob(".old-*")]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints."""
    checkpoints = list_checkpoints(root)
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
