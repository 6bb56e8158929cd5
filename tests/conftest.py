"""Shared fixtures. Tests run from the repository root (pytest's rootdir) on the shipped tiny data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "data" / "tokenizer-tiny"
TINY_SFT = ROOT / "data" / "sft-tiny" / "train.jsonl"
TINY_RECIPE = ROOT / "recipes" / "sft-tiny.yaml"


@pytest.fixture(scope="session")
def tokenizer():
    from align.models.loading import load_tokenizer

    return load_tokenizer(str(TINY_TOKENIZER))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
