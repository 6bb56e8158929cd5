"""Sandboxed code-execution throughput: `code_execution` on canonical HumanEval solutions, and what it costs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sandbox.py [--samples 64] [--workers 1,2] [--out FILE]

Rows:
- `python -I -c pass`: a bare interpreter start as a plain subprocess, one after the other, for the trainer's
  interpreter and for the one the sandbox runs (they differ when the trainer's is unreachable by the sandbox
  user); the floor any per-sample process pays.
- `run_sandboxed("pass")`: the same start inside the full sandbox (namespaces, mounts, uid drop, rlimits).
- `code_execution, N workers`: the reward on `--samples` canonical solutions of data/code-tiny (train then
  held-out rows, cycled), one sandbox per sample with every unit test in it; each must score 1.0.
executions/s counts processes (samples); tests/s counts the asserts they ran. The best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from rewards.base import Sample  # noqa: E402
from rewards.code import code_execution  # noqa: E402
from rewards.sandbox import run_sandboxed, sandbox_python  # noqa: E402


def best_rate(count: int, run, repeats: int) -> float:
    """Highest count / seconds over `repeats` runs of `run()`."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def canonical_samples(count: int) -> list[Sample]:
    rows = []
    for split in ("train", "heldout"):
        rows += [json.loads(line) for line in (REPO_ROOT / "data" / "code-tiny" / f"{split}.jsonl").open()]
    return [Sample(row["prompt"], row["answer"], row) for row in itertools.islice(itertools.cycle(rows), count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="canonical solutions scored per run")
    parser.add_argument("--workers", default="1,2", help="comma-separated pool sizes to measure")
    parser.add_argument("--starts", type=int, default=64, help="bare interpreter/sandbox starts measured")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement (best is kept)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    sandboxed_python = sandbox_python()
    rows = []
    for python in dict.fromkeys([sys.executable, sandboxed_python]):
        rate = best_rate(args.starts, lambda p=python: [subprocess.run([p, "-I", "-c", "pass"], check=True)
                                                        for _ in range(args.starts)], args.repeats)
        rows.append({"what": f"python -I -c pass ({python})", "executions_per_s": rate, "tests_per_s": None})
    rate = best_rate(args.starts, lambda: [run_sandboxed("pass") for _ in range(args.starts)], args.repeats)
    rows.append({"what": 'run_sandboxed("pass")', "executions_per_s": rate, "tests_per_s": None})

    samples = canonical_samples(args.samples)
    for workers in (int(w) for w in args.workers.split(",")):
        scores = code_execution(samples, workers=workers)
        if scores.values != [1.0] * len(samples):
            raise SystemExit(f"a canonical solution did not score 1.0: {scores.info}")
        tests = sum(info["total"] for info in scores.info)
        rate = best_rate(len(samples), lambda w=workers: code_execution(samples, workers=w), args.repeats)
        rows.append({"what": f"code_execution, {workers} worker{'s' * (workers > 1)}", "executions_per_s": rate,
                     "tests_per_s": rate * tests / len(samples)})

    print(f"\n{'what':<60} {'executions/s':>12} {'tests/s':>8}")
    for row in rows:
        tests = f"{row['tests_per_s']:.0f}" if row["tests_per_s"] else "-"
        print(f"{row['what']:<60} {row['executions_per_s']:>12.1f} {tests:>8}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
