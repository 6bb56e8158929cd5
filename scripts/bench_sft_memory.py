"""Peak memory of `align sft` against data-set size: streaming should keep it flat.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sft_memory.py [--rows 10000,200000] [--steps 150] \
        [--out runs/bench_sft_memory.json]

For each row count, writes a chat JSONL file of that many rows into a temporary directory (rows drawn at
random from data/sft-tiny/train.jsonl with every number in them redrawn with as many digits, the same
replacement for the same number within a row: realistic lengths and vocabulary, arithmetic not right), then
runs the real `align sft` on it (1 learner, one thread, `--steps` optimizer steps, the recipe's shuffle buffer)
and watches the whole process tree: the driver (`align`), the learner (the Ray actor `ray::Host`) and Ray's own
processes (GCS, raylet, agents, idle workers). The step count is the same for every size, so every run reads
the same number of rows (the shuffle buffer plus about 30 samples a step, more than the buffer again at the
default 150 steps): a reader that loaded the whole file would show up as memory growing with the file.

Two peak measures per role: `rss` is the largest resident set sampled every `--interval` seconds (psutil,
summed over the role's processes at each sample); `hwm` is the kernel's own per-process high-water mark
(VmHWM in /proc/PID/status, read at every sample, so it misses at most the last interval of a process's life),
summed over the role's processes. `total` is the largest sampled sum over the whole tree.

Prints a table (rows, file size, driver / learner / Ray / total peaks in MiB) and the ratio of the largest to
the smallest data set for each, and writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
ROLES = ("driver", "learner", "ray")
NUMBER = re.compile(r"\d+")


def redraw_numbers(text: str, mapping: dict[str, str], rng: random.Random) -> str:
    """Replace every number by one with as many digits; a number seen before in the row keeps its replacement."""
    def replace(match: re.Match[str]) -> str:
        old = match.group()
        if old not in mapping:
            low = 10 ** (len(old) - 1) if len(old) > 1 else 0
            mapping[old] = str(rng.randint(low, 10 ** len(old) - 1))
        return mapping[old]

    return NUMBER.sub(replace, text)


def write_chat_file(source: Path, rows: int, path: Path, seed: int) -> int:
    """`rows` chat rows sampled from `source` with redrawn numbers; returns the file size in bytes."""
    rng = random.Random(seed)
    templates = [json.loads(line)["messages"] for line in source.read_text(encoding="utf-8").splitlines() if line]
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            mapping: dict[str, str] = {}
            messages = [{"role": m["role"], "content": redraw_numbers(m["content"], mapping, rng)}
                        for m in rng.choice(templates)]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path.stat().st_size


def role_of(process: psutil.Process, driver_pid: int) -> str:
    if process.pid == driver_pid:
        return "driver"
    # Ray titles an actor's process after its class ("ray::Host", "ray::Host.call"): the learner.
    return "learner" if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::Host") else "ray"


def vm_hwm_bytes(pid: int) -> int:
    """The kernel's peak resident set of a process (VmHWM), 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class TreeWatch:
    """Memory samples of a process tree; roles are settled at the end, since the Ray worker that becomes the
    learner starts out as an idle worker."""

    driver_pid: int
    roles: dict[int, str] = field(default_factory=dict)  # pid -> role; once a learner, always a learner
    hwm: dict[int, int] = field(default_factory=dict)  # pid -> largest VmHWM read
    samples: list[dict[int, int]] = field(default_factory=list)  # per sample: pid -> RSS bytes

    def sample(self) -> None:
        try:
            driver = psutil.Process(self.driver_pid)
            tree = [driver, *driver.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = {}
        for process in tree:
            try:
                if self.roles.get(process.pid) != "learner":
                    self.roles[process.pid] = role_of(process, self.driver_pid)
                rss[process.pid] = process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.hwm[process.pid] = max(self.hwm.get(process.pid, 0), vm_hwm_bytes(process.pid))
        self.samples.append(rss)

    def summary(self) -> dict[str, Any]:
        peak_rss = dict.fromkeys((*ROLES, "total"), 0)
        for rss in self.samples:
            for role in ROLES:
                peak_rss[role] = max(peak_rss[role], sum(v for pid, v in rss.items() if self.roles[pid] == role))
            peak_rss["total"] = max(peak_rss["total"], sum(rss.values()))
        hwm = dict.fromkeys(ROLES, 0)
        for pid, value in self.hwm.items():
            hwm[self.roles[pid]] += value
        learners = sum(role == "learner" for role in self.roles.values())
        return {"rss_mib": {k: v / MIB for k, v in peak_rss.items()},
                "hwm_mib": {k: v / MIB for k, v in hwm.items()}, "samples": len(self.samples),
                "processes": len(self.roles), "learner_processes": learners}


def run_align(recipe: str, data: Path, steps: int, run_dir: Path, interval: float, log_path: Path) -> dict[str, Any]:
    """Run `align sft` on `data`, sampling its process tree until it exits."""
    align_bin = Path(sys.executable).with_name("align")
    command = [str(align_bin), "sft", recipe, f"data.train=[{data}]", "cluster.num_workers=1",
               "cluster.threads_per_worker=1", f"train.max_steps={steps}", "output.save_every=0",
               f"output.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        watch = TreeWatch(process.pid)
        while process.poll() is None:
            watch.sample()
            time.sleep(interval)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{tail}")
    summary = watch.summary()
    if summary["learner_processes"] != 1:
        raise RuntimeError(f"expected one learner process (ray::Host) in the tree, saw {summary['learner_processes']}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {**summary, "seconds": time.perf_counter() - started, "steps": len(records),
            "samples_trained": sum(r["samples"] for r in records), "epoch_reached": records[-1]["epoch"],
            "command": " ".join(command)}


def print_table(results: list[dict[str, Any]]) -> dict[str, float]:
    """The table, and the ratio largest / smallest data set of every peak."""
    columns = [(f"{kind} {role}", kind, role) for role in (*ROLES, "total") for kind in ("rss", "hwm")
               if not (kind == "hwm" and role == "total")]
    print(f"\n{'rows':>8} {'file MiB':>9} " + " ".join(f"{name:>12}" for name, _, _ in columns) + "   (MiB)")
    for r in results:
        print(f"{r['rows']:>8} {r['file_mib']:>9.1f} "
              + " ".join(f"{r[f'{kind}_mib'][role]:>12.0f}" for _, kind, role in columns))
    small, large = results[0], results[-1]
    ratios = {name: large[f"{kind}_mib"][role] / small[f"{kind}_mib"][role] for name, kind, role in columns}
    label = f"{large['rows']}/{small['rows']}"
    print(f"{label:>18} " + " ".join(f"{ratios[name]:>11.2f}x" for name, _, _ in columns))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,200000", help="comma-separated data-set sizes, smallest first")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (same for every size)")
    parser.add_argument("--recipe", default="recipes/sft-tiny.yaml", help="SFT recipe (its data.train is replaced)")
    parser.add_argument("--source", type=Path, default=ROOT / "data/sft-tiny/train.jsonl", help="rows to sample from")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated rows")
    parser.add_argument("--out", default="runs/bench_sft_memory.json", help="where to write the results as JSON")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.rows.split(","))

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_sft_memory_") as tmp:
        work = Path(tmp)
        for rows in sizes:
            data = work / f"chat-{rows}.jsonl"
            size = write_chat_file(args.source, rows, data, args.seed)
            print(f"bench_sft_memory: {rows} rows ({size / MIB:.1f} MiB), align sft for {args.steps} steps ...",
                  flush=True)
            result = run_align(args.recipe, data, args.steps, work / f"run-{rows}", args.interval,
                               work / f"run-{rows}.log")
            results.append({"rows": rows, "file_mib": size / MIB, **result})
            print(f"bench_sft_memory: {rows} rows: {result['samples_trained']} samples in {result['steps']} steps, "
                  f"epoch {result['epoch_reached']:.3f}, total peak {result['rss_mib']['total']:.0f} MiB "
                  f"({result['seconds']:.0f} s)", flush=True)
            data.unlink()
    ratios = print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {"rows": sizes, "steps": args.steps, "recipe": args.recipe,
                                            "interval_s": args.interval, "seed": args.seed},
                               "results": results, "ratio_largest_over_smallest": ratios}, indent=2))
    print(f"bench_sft_memory: results in {out}")


if __name__ == "__main__":
    main()
