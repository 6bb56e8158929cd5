"""SFT throughput: `align sft` against TRL's SFTTrainer on the same model, data, batch and thread budget.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sft.py [--steps 60] [--warmup 10] \
        [--modes align,trl-packed,trl-unpacked,trl-wrapped] [--zero-stage 2] [--out runs/bench_sft.json]

Default modes: align, trl-packed, trl-unpacked (about 3 minutes at 60 steps on 2 cores; a smoke run:
`--steps 12 --warmup 4`, about 1.5 minutes). Every mode runs in its own subprocess with one torch thread,
one after the other (never two at once):
- `align`: the real `align sft RECIPE` command, 1 Ray learner, DeepSpeed ZeRO-`--zero-stage`, rows of
  `max_length` tokens packed with several samples each (attention never crosses samples).
- `trl-packed`: SFTTrainer with `packing=True` (TRL's default strategy "bfd", which makes it padding-free:
  the batch is flattened into one row and `position_ids` keep the samples apart).
- `trl-unpacked`: `packing=False`, one sample per row, padded to the longest row of the batch.
- `trl-wrapped`: `packing_strategy="wrapped"`, rows cut mid-sample, samples attend to each other
  (cheaper, but not the same computation; shown for reference, not for the target).

Both sides train the model of `model.preset` (fresh weights from `model.seed`, fp32, same attention and
expert kernels) on the first rows of `data.train`, batch `train.micro_batch_size`, rows of `data.max_length`
tokens, loss on assistant tokens only, no gradient checkpointing. TRL's `assistant_only_loss` reads the
`{% generation %}` markers of our chat template; every run checks that TRL's assistant mask equals align's
labels, token for token, on its first rows (`label_check` in the JSON), so both train on the same tokens.

tokens/s = non-padding tokens processed / wall time of steady-state steps (steps after `--warmup`), summed over
those steps. align: `tokens` and `step_s` of metrics.jsonl (driver wall time of one `train_step` call,
batch building included). TRL: transformers' non-padding token count (`include_num_input_tokens_seen`), and
the time between consecutive `on_step_end` callbacks (batch fetch, forward, backward, optimizer step).
`compute_s` is the time without the batch fetch (TRL: `on_step_begin` -> `on_step_end`) or without the Ray
call (align: the learner's own `compute_s`), for reference.

Not equal on purpose: align also computes DeepSeek-V2's three balance losses from the router logits; TRL adds
no auxiliary loss for this model (transformers' DeepSeek-V2 returns none), so align does a little more work.

Prints a table (mode, tokens per step, step time, tokens/s, align's ratio to that mode) and the verdict on
the target align / trl-packed >= 1.5x, and writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.5
LABEL_CHECK_ROWS = 500
# The benchmark's settings on top of the recipe, for both sides.
BENCH_OVERRIDES = ["cluster.num_workers=1", "cluster.threads_per_worker=1", "train.micro_batch_size=8",
                   "train.grad_accum=1", "data.max_length=256", "data.packing=true", "deepspeed.precision=fp32",
                   "model.dtype=float32"]

# SFTConfig fields of each TRL mode, and the label printed for it.
TRL_MODES: dict[str, dict[str, Any]] = {
    "trl-packed": {"packing": True, "packing_strategy": "bfd"},
    "trl-unpacked": {"packing": False},
    "trl-wrapped": {"packing": True, "packing_strategy": "wrapped"},
}
LABELS = {
    "align": "align sft (packed rows, samples kept apart)",
    "trl-packed": "TRL packing=True (bfd, padding-free)",
    "trl-unpacked": "TRL packing=False (padded)",
    "trl-wrapped": "TRL wrapped packing (cross-sample attention!)",
}



def subprocess_env() -> dict[str, str]:
    """One BLAS/OpenMP thread per process: with two, step times on this contended machine jump at random."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_logged(command: list[str], log_path: Path) -> None:
    """Run a command with its output in `log_path`; on failure raise with the log's last lines."""
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} exited with {code}; last lines of {log_path}:\n{tail}")


def steady_rate(tokens: list[int], step_s: list[float], compute_s: list[float]) -> dict[str, float]:
    """Throughput over the measured steps: total tokens / total time (not a mean of per-step rates)."""
    total_s = sum(step_s)
    return {"steps_measured": len(tokens), "tokens_per_step": sum(tokens) / len(tokens),
            "step_s": total_s / len(step_s), "compute_s": sum(compute_s) / len(compute_s),
            "tokens_per_s": sum(tokens) / total_s, "compute_tokens_per_s": sum(tokens) / sum(compute_s)}


def align_command(recipe: str, steps: int, zero_stage: int, run_dir: Path) -> list[str]:
    """`align sft` with the benchmark's settings on top of the recipe."""
    align_bin = Path(sys.executable).with_name("align")
    executable = str(align_bin) if align_bin.exists() else shutil.which("align") or "align"
    return [executable, "sft", recipe, *BENCH_OVERRIDES, f"train.max_steps={steps}",
            f"deepspeed.zero_stage={zero_stage}", "output.save_every=0", f"output.dir={run_dir}"]


def bench_align(recipe: str, steps: int, warmup: int, zero_stage: int, work: Path) -> dict[str, Any]:
    run_dir = work / "align-run"
    command = align_command(recipe, steps, zero_stage, run_dir)
    started = time.perf_counter()
    run_logged(command, work / "align.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in records if r["step"] > warmup]
    if not steady:
        raise RuntimeError(f"align logged {len(records)} steps, none after the {warmup} warm-up steps")
    result = steady_rate([int(r["tokens"]) for r in steady], [r["step_s"] for r in steady],
                         [r["compute_s"] for r in steady])
    return {**result, "command": " ".join(command), "process_s": time.perf_counter() - started,
            "final_lm_loss": records[-1]["lm_loss"]}


def bench_trl(mode: str, recipe: str, steps: int, warmup: int, work: Path) -> dict[str, Any]:
    result_path = work / f"{mode}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", mode, "--recipe", recipe,
               "--steps", str(steps), "--warmup", str(warmup), "--result", str(result_path)]
    started = time.perf_counter()
    run_logged(command, work / f"{mode}.log")
    return {**json.loads(result_path.read_text()), "process_s": time.perf_counter() - started}


# ---- the TRL side, run in a subprocess of its own (`--trl-worker MODE`) ----

def check_labels(tokenizer: Any, rows: list[dict], max_length: int) -> str:
    """Raise unless TRL's assistant mask and token ids equal align's labels and ids on every row."""
    from align.data.chat import IGNORE_INDEX, tokenize_chat

    for number, row in enumerate(rows, start=1):
        ours = tokenize_chat(tokenizer, row["messages"], max_length)
        theirs = tokenizer.apply_chat_template(row["messages"], tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        mask = [int(label != IGNORE_INDEX) for label in ours.labels]
        if theirs["input_ids"][:max_length] != ours.input_ids or theirs["assistant_masks"][:max_length] != mask:
            raise RuntimeError(f"row {number}: TRL and align disagree on the tokens or the assistant mask")
    return f"TRL assistant mask == align labels on {len(rows)}/{len(rows)} rows"


def read_rows(path: str, count: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if len(rows) == count:
                break
            if line.strip():
                rows.append({"messages": json.loads(line)["messages"]})
    return rows


def trl_worker(mode: str, recipe_path: str, steps: int, warmup: int, result_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from align.config import load_sft_recipe
    from align.models.loading import build_model, load_tokenizer

    torch.set_num_threads(1)
    recipe = load_sft_recipe(recipe_path, BENCH_OVERRIDES)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
    batch, max_length = recipe.train.micro_batch_size, recipe.data.max_length
    # About 3.7 samples fill a packed row here; 8 per row is ample, and beyond it TRL only tokenizes more up front.
    rows = read_rows(recipe.data.train[0], steps * batch * 8)
    label_check = check_labels(tokenizer, rows[:LABEL_CHECK_ROWS], max_length)
    model = build_model(recipe.model, tokenizer)

    class StepClock(TrainerCallback):
        """Per-step timestamps and non-padding token counts, read from the trainer's state."""

        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []
            self.tokens_seen: list[int] = [0]

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end.append(time.perf_counter())
            self.tokens_seen.append(int(state.num_input_tokens_seen))

    train = recipe.train
    config = SFTConfig(
        output_dir=str(result_path.parent / f"{mode}-out"), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=train.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": train.min_lr_ratio}, warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay, adam_beta1=train.betas[0], adam_beta2=train.betas[1],
        max_grad_norm=train.max_grad_norm, seed=train.seed, max_length=max_length, assistant_only_loss=True,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", **TRL_MODES[mode])
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[clock])
    trainer.train()

    tokens = [after - before for before, after in zip(clock.tokens_seen, clock.tokens_seen[1:])]
    step_s = [after - before for before, after in zip(clock.end, clock.end[1:])]  # step i: end[i] - end[i-1]
    compute_s = [end - begin for begin, end in zip(clock.begin, clock.end)]
    measured = range(max(warmup, 1), len(tokens))
    result = steady_rate([tokens[i] for i in measured], [step_s[i - 1] for i in measured],
                         [compute_s[i] for i in measured])
    result.update(label_check=label_check, rows=len(rows), trl_config=TRL_MODES[mode],
                  padding_free=trainer.padding_free, optimizer=str(config.optim))
    result_path.write_text(json.dumps(result))


# ---- the driver ----

def print_table(results: dict[str, dict[str, Any]]) -> None:
    align = results.get("align")
    print(f"\n{'mode':<48} {'tokens/step':>11} {'step s':>8} {'tokens/s':>9} {'align/this':>10}")
    for mode, r in results.items():
        ratio = f"{align['tokens_per_s'] / r['tokens_per_s']:.2f}x" if align and mode != "align" else ""
        print(f"{LABELS[mode]:<48} {r['tokens_per_step']:>11.0f} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{ratio:>10}")
    if align and "trl-packed" in results:
        ratio = align["tokens_per_s"] / results["trl-packed"]["tokens_per_s"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"\nalign / TRL-packed = {ratio:.2f}x (target >= {TARGET_RATIO}x: {verdict})")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "trl", "deepspeed", "ray", "accelerate", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the measurement")
    parser.add_argument("--modes", default="align,trl-packed,trl-unpacked",
                        help=f"comma-separated, from: align, {', '.join(TRL_MODES)}")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3],
                        help="align's DeepSpeed ZeRO stage (0 is refused in fp32: it has no non-finite check)")
    parser.add_argument("--recipe", default="recipes/sft-tiny.yaml", help="SFT recipe giving model, data and lr")
    parser.add_argument("--out", default="runs/bench_sft.json", help="where to write the results as JSON")
    parser.add_argument("--trl-worker", choices=list(TRL_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker, args.recipe, args.steps, args.warmup, args.result)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in LABELS]
    if unknown or args.warmup < 1 or args.steps <= args.warmup:
        parser.error(f"unknown modes {unknown}" if unknown else "need 1 <= --warmup < --steps")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        work = Path(tmp)
        for mode in modes:
            print(f"bench_sft: {mode}: {args.steps} steps ({args.warmup} warm-up) ...", flush=True)
            if mode == "align":
                results[mode] = bench_align(args.recipe, args.steps, args.warmup, args.zero_stage, work)
            else:
                results[mode] = bench_trl(mode, args.recipe, args.steps, args.warmup, work)
            r = results[mode]
            print(f"bench_sft: {mode}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.3f} s/step "
                  f"({r['process_s']:.0f} s in all)" + (f"; {r['label_check']}" if "label_check" in r else ""),
                  flush=True)
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    align = results.get("align")
    ratios = {f"align/{mode}": align["tokens_per_s"] / r["tokens_per_s"]
              for mode, r in results.items() if align and mode != "align"}
    out.write_text(json.dumps({
        "settings": {"steps": args.steps, "warmup": args.warmup, "zero_stage": args.zero_stage,
                     "recipe": args.recipe, "micro_batch_size": 8, "max_length": 256, "threads_per_process": 1,
                     "cpu_count": os.cpu_count(), "target_align_over_trl_packed": TARGET_RATIO},
        "versions": versions(), "labels": {m: LABELS[m] for m in results}, "results": results, "ratios": ratios,
    }, indent=2))
    print(f"bench_sft: results in {out}")


if __name__ == "__main__":
    main()
