"""Running `align` and the scripts as real processes for tests that kill, signal and resume them, and comparing
runs. The test session never inherits a RAY_ADDRESS (tests/conftest.py removes it): a process joins a Ray only
when given one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

LEARNING = ("loss", "policy_loss", "kl", "reward/mean", "reward/std", "completion_length", "grad_norm",
            "zero_std_groups", "completions")


def launch(command: str, args: list[str], run_dir: Path) -> subprocess.Popen:
    """`align COMMAND ARGS output.dir=RUN_DIR` in a new session (as a terminal would run it); output to files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir.parent / f"{run_dir.name}.log").open("a")
    return subprocess.Popen([sys.executable, "-m", "align.cli", command, *args, f"output.dir={run_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def script(name: str, *args: str, ray_address: str | None = None, timeout: int = 600) -> str:
    """`python scripts/NAME ARGS` from the repository root with one thread per process; its output. With
    `ray_address`, the `align` runs it starts join that Ray (RAY_ADDRESS) instead of starting their own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    result = subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 600) -> tuple[int, str]:
    code = process.wait(timeout=timeout)
    return code, (run_dir.parent / f"{run_dir.name}.log").read_text()


def run(command: str, args: list[str], run_dir: Path) -> str:
    code, output = finish(launch(command, args, run_dir), run_dir)
    assert code == 0, output[-3000:]
    return output


def wait_until(condition, process: subprocess.Popen, timeout: float = 300, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def assert_same_run(run_dir: Path, reference: Path, keys: tuple[str, ...] = LEARNING) -> None:
    """Step by step the same metrics (to fp tolerance) and, for GRPO, the same samples (exactly)."""
    got, want = records(run_dir, "metrics.jsonl"), records(reference, "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for mine, theirs in zip(got, want):
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (mine["step"], key)
    if (reference / "samples.jsonl").exists():
        assert records(run_dir, "samples.jsonl") == records(reference, "samples.jsonl")


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def survivors(processes: list[psutil.Process], grace: float) -> list[psutil.Process]:
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
