"""GRPO on the tiny recipe at several `algorithm.max_staleness` values and seeds, one run after another, then
one table: held-out accuracy before -> after per seed, the mean gain with its standard error over the seeds,
and per k the means over all steps and seeds of the engine-learner mismatch, the clipped and the truncated
token shares, the staleness and the seconds per step.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/staleness_table.py --steps 100            # k = 0, 1, 2; seeds 0, 1
    .venv/bin/python scripts/staleness_table.py --steps 100 --summarise-only             # the table again
    ... -- section.key=value ...                                                       # more overrides per run

Each run is `align grpo RECIPE algorithm.max_staleness=K algorithm.seed=S data.seed=S` into OUT/k{K}-s{S}
(its log beside it); the table goes to OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

HELDOUT = re.compile(r"held-out \S+ ([\d.]+)% -> ([\d.]+)%")
MEANS = {"mean abs logp gap": "mismatch/logp_abs_mean", "mismatch k3 KL": "mismatch/kl_k3",
         "clipped share": "clip_ratio/region_mean", "truncated share": "is_truncated",
         "staleness": "staleness/mean", "s/step": "step_s"}


def run_one(recipe: str, overrides: list[str], log: Path) -> None:
    command = [sys.executable, "-m", "align.cli", "grpo", recipe, *overrides]
    print("staleness_table:", " ".join(command[2:]), flush=True)
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code != 0:
        raise SystemExit(f"staleness_table: the run failed (exit {code}); see {log}")


def summarise(run_dir: Path, log: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    match = HELDOUT.search(log.read_text())
    if match is None:
        raise SystemExit(f"staleness_table: no held-out accuracy in {log}")
    summary = {"before": float(match.group(1)), "after": float(match.group(2)), "steps": len(records)}
    for name, key in MEANS.items():  # a step whose batch held nothing that counts has no learner metrics
        values = [r[key] for r in records if key in r]
        summary[name] = sum(values) / len(values) if values else float("nan")
    summary["max abs logp gap"] = max((r["mismatch/logp_abs_max"] for r in records if "mismatch/logp_abs_max" in r),
                                      default=float("nan"))
    return summary


def mean_and_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def table(results: dict[int, dict[int, dict[str, float]]]) -> str:
    seeds = sorted(next(iter(results.values())))
    head = ["k", *(f"held-out, seed {s}" for s in seeds), "mean gain +- s.e.", *MEANS, "max abs logp gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, by_seed in sorted(results.items()):
        gain, se = mean_and_se([r["after"] - r["before"] for r in by_seed.values()])
        cells = [str(k), *(f"{by_seed[s]['before']:.1f}% -> {by_seed[s]['after']:.1f}%" for s in seeds),
                 f"{gain:+.1f} +- {se:.1f} points"]
        for name in [*MEANS, "max abs logp gap"]:
            values = [r[name] for r in by_seed.values()]
            value = max(values) if name.startswith("max") else sum(values) / len(values)
            cells.append(f"{value:.3f}" if name in ("s/step", "staleness") else f"{value:.2e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/grpo-tiny.yaml")
    parser.add_argument("--model", default="runs/demo-sft/final", help="the SFT checkpoint GRPO starts from")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2], help="max_staleness values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("runs/staleness"))
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild the table from the runs")
    parser.add_argument("overrides", nargs="*", help="recipe overrides added to every run (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[int, dict[str, float]]] = {}
    for k in args.k:
        for seed in args.seeds:
            run_dir, log = args.out / f"k{k}-s{seed}", args.out / f"k{k}-s{seed}.log"
            if not args.summarise_only:
                run_one(args.recipe, [f"model.path={args.model}", f"algorithm.steps={args.steps}",
                                      f"algorithm.max_staleness={k}", f"algorithm.seed={seed}", f"data.seed={seed}",
                                      f"output.dir={run_dir}", "output.overwrite=true", *args.overrides], log)
            results.setdefault(k, {})[seed] = summarise(run_dir, log)
            print(f"staleness_table: k={k} seed={seed}: {results[k][seed]}", flush=True)
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps({"steps": args.steps, "recipe": args.recipe,
                                                     "model": args.model, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
