"""`align sft`: the single-controller driver for supervised fine-tuning.

    check recipe and data -> start Ray -> N learners (DeepSpeed, data-parallel) ->
    for each step: every learner trains on its shard -> log -> checkpoint -> export a HF model.

The driver holds no model; it decides when to step, save and stop, and reports progress.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from align import checkpoint
from align.config.loader import to_dict
from align.config.schema import SFTRecipe
from align.data.stream import preflight
from align.distributed.worker_group import WorkerGroup
from align.metrics import MetricsLog, plot_curves
from align.models.loading import load_tokenizer
from align.trainers.learner_group import (
    construct_learners,
    export_model,
    learner_group,
    resume_step,
    save_checkpoint,
)
from align.trainers.run_control import RunControl
from align.trainers.sft_learner import SFTLearner


def estimate_total_steps(recipe: SFTRecipe, mean_tokens: float, total_rows: int) -> int:
    """Optimizer steps for `train.max_steps`, or for `train.epochs` passes at the expected packing.

    samples per row ~ 0.95 * max_length / mean tokens per sample when packing (rows fill to about 95%), else 1.
    """
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    per_row = max(1.0, 0.95 * recipe.data.max_length / mean_tokens) if recipe.data.packing else 1.0
    samples_per_step = recipe.train.global_batch_size * per_row
    return max(1, math.ceil(total_rows * recipe.train.epochs / samples_per_step))


def reduce_metrics(per_rank: list[dict[str, float]], seconds: float) -> dict[str, float]:
    """Sums for counts, means for losses and rates, slowest rank for compute time."""
    totals = {"tokens", "target_tokens", "samples"}
    merged: dict[str, float] = {}
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        if key in totals or key.startswith("data/"):
            merged[key] = sum(values)
        elif key == "epoch":
            merged[key] = min(values)
        elif key == "compute_s":
            merged[key] = max(values)
        else:
            merged[key] = sum(values) / len(values)
    merged["step_s"] = seconds
    merged["tokens_per_s"] = merged["tokens"] / seconds
    return merged


def run_sft(recipe: SFTRecipe, resume: bool = False) -> dict[str, Any]:
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
    stats = preflight(recipe.data, tokenizer)
    run_dir = checkpoint.prepare_run_dir(Path(recipe.output.dir), resume, recipe.output.overwrite)
    total_steps = estimate_total_steps(recipe, stats["mean_tokens"], int(stats["total_rows"]))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))

    with learner_group("sft-learners", recipe.cluster) as group:
        return _train(recipe, group, run_dir, total_steps, resume)


def _train(recipe: SFTRecipe, group: WorkerGroup, run_dir: Path, total_steps: int, resume: bool) -> dict:
    construct_learners(group, SFTLearner, recipe, total_steps)
    world = len(group)
    info = group.call("info")[0]
    step = resume_step(group, run_dir, resume)
    print(f"align sft: {info['parameters'] / 1e6:.2f}M parameters ({info['trainable'] / 1e6:.2f}M trainable), "
          f"{'MoE' if info['moe'] else 'dense'}, {world} x DeepSpeed ZeRO-{recipe.deepspeed.zero_stage} on "
          f"{info['backend']}, {info['rows']} rows, {total_steps} steps" +
          (f", resumed at step {step}" if step else ""))

    log = MetricsLog(run_dir)
    first_loss = last = None
    tokens_seen, train_seconds = 0, 0.0
    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", dynamic_ncols=True)
    try:
        with RunControl("align sft", recipe.train.max_nonfinite_in_row) as control:
            while not _finished(recipe, step, total_steps, last):
                step_started = time.perf_counter()
                last = reduce_metrics(group.call("train_step"), time.perf_counter() - step_started)
                step += 1
                tokens_seen += last["tokens"]
                train_seconds += last["step_s"]
                first_loss = last["lm_loss"] if first_loss is None else first_loss
                if step % recipe.output.log_every == 0:
                    log.log(step, last)
                bar.update(1)
                bar.set_postfix(loss=f"{last['lm_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                epoch=f"{last['epoch']:.2f}")
                control.after_step(step, last["skipped_updates"], recipe.output.save_every,
                                   lambda s: save_checkpoint(group, run_dir, s, recipe.output.keep_last))
    finally:
        bar.close()
        log.close()
    if last is None:
        raise RuntimeError("no training step ran (max_steps reached already?)")
    save_checkpoint(group, run_dir, step, recipe.output.keep_last)
    final = export_model(group, run_dir)
    plot = plot_curves(run_dir / "metrics.jsonl", ["lm_loss", "balance_loss", "tokens_per_s", "lr"],
                       run_dir / "loss.png", f"align sft: {run_dir.name}")
    summary = {"steps": step, "first_loss": first_loss, "final_loss": last["lm_loss"],
               "tokens": tokens_seen, "tokens_per_s": tokens_seen / train_seconds, "model": str(final),
               "plot": str(plot), "run_dir": str(run_dir)}
    print(f"align sft: done, {step} steps, loss {first_loss:.3f} -> {last['lm_loss']:.3f}, "
          f"{summary['tokens_per_s']:.0f} tokens/s while training; model: {final}; curves: {plot}")
    return summary


def _finished(recipe: SFTRecipe, step: int, total_steps: int, last: dict | None) -> bool:
    if recipe.train.max_steps > 0 or last is None:
        return step >= total_steps
    return last["epoch"] >= recipe.train.epochs
