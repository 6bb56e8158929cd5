"""Fault injection: run `align grpo` while killing its workers (kill -9), and report what survived.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fault_inject.py --kills 6 --steps 30
    OMP_NUM_THREADS=1 .venv/bin/python scripts/fault_inject.py ... --reference DIR -- [align overrides]

Overrides after `--` change the recipe (they come after the script's own, before the step count and the
output directory, which stay the script's). `--reference DIR` compares with an uninterrupted run made
earlier with the same recipe instead of making one (its recipe.yaml must match, output.dir aside).

Rollout engines and reward workers are killed while the run goes on (align replaces them and redoes their
share); a learner or the driver kill stops the run, which is then restarted with --resume, as an operator
would. The targets are read from the run's workers.json. At the end the script reports the steps completed,
the kills by kind, the restarts align made, the samples lost (must be 0), whether the faulted run's
per-step record equals that of an uninterrupted run with the same seeds (--reference, on by default) and
whether the final checkpoint resumes (two more steps with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.metrics import read_metrics  # noqa: E402

KINDS = ("rollout", "reward", "learner", "driver")
LEARNING = ("loss", "policy_loss", "kl", "reward/mean", "completion_length", "grad_norm")


def recipe_args(steps: int, run_dir: Path, overrides: list[str]) -> list[str]:
    """The tiny GRPO recipe, from the demo's SFT checkpoint when there is one, else a fresh tiny MoE; then the
    user's `overrides`; then the step count and the run directory."""
    model = [] if (ROOT / "runs/demo-sft/final/config.json").exists() else [
        "model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny"]
    return ["grpo", "recipes/grpo-tiny.yaml", *model, "data.heldout=null", "algorithm.prompts_per_step=8",
            "algorithm.group_size=4", "train.micro_batch_size=16", "rollout.max_new_tokens=32",
            "output.save_every=5", *overrides, f"algorithm.steps={steps}", f"output.dir={run_dir}"]


def recipe_of(run_dir: Path) -> dict:
    """The recipe a run was trained with (its recipe.yaml), without what does not change the computation: the
    output directory and the Ray cluster it ran on."""
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["output"].pop("dir")
    recipe["cluster"].pop("ray_address")
    return recipe


def launch(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "align.cli", *args], cwd=ROOT, start_new_session=True,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def pick_victim(run_dir: Path, kinds: list[str], rng: random.Random, driver: subprocess.Popen) -> tuple[str, int]:
    kind = rng.choice(kinds)
    if kind == "driver":
        return kind, driver.pid
    workers = json.loads((run_dir / "workers.json").read_text())
    group = {"rollout": "rollout", "learner": "grpo-learners"}.get(kind) or rng.choice(
        [name for name in workers if name.startswith("reward-")])
    pids = [pid for pid in workers[group] if pid]
    return kind, rng.choice(pids)


def faulted_run(args: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    rng = random.Random(args.seed)
    kinds = args.targets.split(",")
    kills = {kind: 0 for kind in kinds}
    launches, pending = 0, args.kills
    resume: list[str] = []
    while True:
        driver = launch([*recipe_args(args.steps, run_dir, args.overrides), *resume], log)
        launches += 1
        resume = ["--resume"]
        while driver.poll() is None:
            # the next kill lands 1-3 steps after the last logged one, at a random moment within the step
            target = logged_steps(run_dir) + rng.randint(1, 3)
            while driver.poll() is None and logged_steps(run_dir) < target:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 1.0))
            if driver.poll() is not None or pending == 0 or logged_steps(run_dir) >= args.steps - 1:
                continue
            kind, pid = pick_victim(run_dir, kinds, rng, driver)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills[kind] += 1
            pending -= 1
            print(f"fault_inject: step {logged_steps(run_dir)}: killed the {kind} (pid {pid})", flush=True)
        driver.wait()
        if driver.returncode == 0:
            break
        if launches > args.kills + 2:
            raise SystemExit(f"fault_inject: the run keeps failing (exit {driver.returncode}); see {log}")
        print(f"fault_inject: align exited {driver.returncode}; relaunching with --resume", flush=True)
    return {"kills": kills, "launches": launches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6, help="workers to kill over the run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--targets", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    parser.add_argument("--seed", type=int, default=0, help="seed for what is killed and when")
    parser.add_argument("--no-reference", dest="compare", action="store_false",
                        help="skip the comparison with an uninterrupted run")
    parser.add_argument("--reference", type=Path,
                        help="an uninterrupted run of the same recipe to compare with, instead of making one")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fault_inject")
    parser.add_argument("overrides", nargs="*", help="align overrides for the recipe (after --)")
    args = parser.parse_args()
    if args.reference is not None and not (args.reference / "metrics.jsonl").is_file():
        parser.error(f"--reference {args.reference}: no metrics.jsonl (not a finished align grpo run)")
    if unknown := set(args.targets.split(",")) - set(KINDS):
        parser.error(f"unknown targets {sorted(unknown)}; choose from {KINDS}")
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    run_dir, log = args.out / "faulted", args.out / "faulted.log"
    started = time.monotonic()
    report = faulted_run(args, run_dir, log)
    report["faulted_s"] = round(time.monotonic() - started, 1)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    report.update(
        steps_completed=metrics[-1]["step"] if metrics else 0, steps_logged=[r["step"] for r in metrics]
        == list(range(1, args.steps + 1)),
        # counted in the logs: a restart between the last checkpoint and a crash is not in the resumed metrics
        engine_restarts=log.read_text().count("redoing its"),
        reward_restarts=log.read_text().count("scoring its share again"),
        samples_lost=sum(r["reward_missing/total"] for r in metrics),
        samples_scored=sum(r["completions"] for r in metrics))
    if args.compare:
        reference = args.reference or args.out / "reference"
        if args.reference is None:
            subprocess.run([sys.executable, "-m", "align.cli", *recipe_args(args.steps, reference, args.overrides)],
                           cwd=ROOT, check=True, stdout=(args.out / "reference.log").open("w"),
                           stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        elif recipe_of(reference) != recipe_of(run_dir):
            raise SystemExit(f"fault_inject: --reference {reference} was trained with another recipe than "
                             f"{run_dir / 'recipe.yaml'}")
        expected = read_metrics(reference / "metrics.jsonl")
        report["same_as_uninterrupted"] = len(expected) == len(metrics) and all(
            abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])) for a, b in zip(metrics, expected) for k in LEARNING) and \
            (run_dir / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    more = subprocess.run([sys.executable, "-m", "align.cli", *recipe_args(args.steps + 2, run_dir, args.overrides),
                           "--resume"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report["final_checkpoint_resumes"] = more.returncode == 0 and f"resumed at step {args.steps}" in more.stdout \
        and logged_steps(run_dir) == args.steps + 2
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"fault_inject: {report['steps_completed']} of {args.steps} steps completed after "
          f"{sum(report['kills'].values())} kills {report['kills']} and {report['launches'] - 1} relaunch(es) with "
          f"--resume; align restarted {report['engine_restarts']} engine(s) and {report['reward_restarts']} reward "
          f"worker(s); samples lost: {report['samples_lost']} of {report['samples_scored']}; "
          f"same as an uninterrupted run: {report.get('same_as_uninterrupted', 'not checked')}; "
          f"final checkpoint resumes: {report['final_checkpoint_resumes']}  ({args.out / 'report.json'})")
    ok = report["samples_lost"] == 0 and report["final_checkpoint_resumes"] and report["steps_logged"] \
        and report.get("same_as_uninterrupted", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
