"""Atomic checkpoint directories: write into a hidden staging directory, then rename into place.

A rename within one file system is atomic, so a run killed mid-write leaves the previous checkpoint
whole and a `.tmp-*` directory that the next start removes. Multi-node runs need a shared file system
for the run directory (every rank writes its own DeepSpeed shard into the staging directory).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """A run directory for a fresh run or a resumed one: refuses to start over a run unless `overwrite`
    (which removes it) and removes leftovers of interrupted checkpoint writes."""
    holds_run = (run_dir / "metrics.jsonl").exists()
    if holds_run and not resume and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or "
                              "output.overwrite=true to start over")
    if holds_run and overwrite and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_staging(run_dir / "checkpoints")
    return run_dir


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) generator states, as JSON-ready lists."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(words), gauss],
                             "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_rng(directory: str | Path, rank: int) -> None:
    (Path(directory) / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))


def load_rng(directory: str | Path, rank: int) -> None:
    set_rng_state(json.loads((Path(directory) / f"rng_rank{rank}.json").read_text()))
