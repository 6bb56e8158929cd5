"""`align rm`: the single-controller driver for reward-model training.

    check recipe and data -> start Ray -> N learners (DeepSpeed, data-parallel) -> held-out accuracy ->
    for each step: every learner trains on its shard -> log -> checkpoint -> held-out accuracy again ->
    export a transformers reward model (`rewards.reward_model:RewardModel` serves it in GRPO).

Same machinery as `align sft` (run directory, checkpoints, metrics, export); only the learner differs.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from align import checkpoint
from align.config.loader import to_dict
from align.config.rm_schema import RMRecipe
from align.data.preferences import preflight
from align.distributed.worker_group import WorkerGroup
from align.metrics import MetricsLog, plot_curves
from align.models.loading import load_tokenizer
from align.rl.rm_losses import pair_metrics, pairwise_loss, pointwise_bce, pointwise_metrics, pointwise_mse
from align.trainers.learner_group import (
    construct_learners,
    export_model,
    learner_group,
    resume_step,
    save_checkpoint,
)
from align.trainers.rm_learner import RMLearner
from align.trainers.run_control import RunControl
from align.trainers.sft import reduce_metrics


def total_steps_for(recipe: RMRecipe, total_rows: int) -> int:
    """`train.max_steps`, or enough steps for `train.epochs` passes (one pair or row per sample, no packing)."""
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    return max(1, math.ceil(total_rows * recipe.train.epochs / recipe.train.global_batch_size))


def heldout_metrics(loss_kind: str, per_rank: list[dict[str, list]]) -> dict[str, float]:
    """Held-out loss, accuracy (pairwise: r_c > r_r; bce: the logit's sign matches the label), margin or mean
    reward, and accuracy per category, from every rank's share of the held-out rows."""
    merged: dict[str, list] = defaultdict(list)
    for part in per_rank:
        for key, values in part.items():
            merged[key] += values
    rewards, targets = torch.tensor(merged["rewards"]), torch.tensor(merged["targets"])
    if loss_kind == "pairwise":
        rejected = torch.tensor(merged["rejected"])
        metrics = {"loss": pairwise_loss(rewards, rejected, targets).item(), **pair_metrics(rewards, rejected)}
        correct = (rewards > rejected).tolist()
    else:
        loss_fn = pointwise_mse if loss_kind == "mse" else pointwise_bce
        metrics = {"loss": loss_fn(rewards, targets).item(),
                   **pointwise_metrics(rewards, targets, binary=loss_kind == "bce")}
        correct = ((rewards > 0).float() == targets).tolist()
    if "accuracy" in metrics:
        by_category: dict[str, list[bool]] = defaultdict(list)
        for category, right in zip(merged["categories"], correct):
            if category is not None:
                by_category[category].append(right)
        metrics.update({f"accuracy/{c}": sum(v) / len(v) for c, v in sorted(by_category.items())})
    metrics["rows"] = len(rewards)
    return {f"heldout/{key}": value for key, value in metrics.items()}


def describe_heldout(after: dict[str, float], before: dict[str, float] | None = None) -> str:
    """'held-out accuracy 0.487 -> 0.863 (300 rows; final_answer 0.49 -> 0.86)', or one value without `before`."""
    def change(key: str, digits: int) -> str:
        return (f"{before[key]:.{digits}f} -> " if before and key in before else "") + f"{after[key]:.{digits}f}"

    if "heldout/accuracy" not in after:
        return f"held-out loss {change('heldout/loss', 4)} ({after['heldout/rows']} rows)"
    prefix = "heldout/accuracy/"
    parts = [f"{key[len(prefix):]} {change(key, 2)}" for key in after if key.startswith(prefix)]
    return (f"held-out accuracy {change('heldout/accuracy', 3)} "
            f"({after['heldout/rows']} rows{'; ' + ', '.join(parts) if parts else ''})")


def run_rm(recipe: RMRecipe, resume: bool = False) -> dict[str, Any]:
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
    stats = preflight(recipe.data, recipe.train.loss, tokenizer)
    run_dir = checkpoint.prepare_run_dir(Path(recipe.output.dir), resume, recipe.output.overwrite)
    total_steps = total_steps_for(recipe, int(stats["total_rows"]))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))

    with learner_group("rm-learners", recipe.cluster) as group:
        return _train(recipe, group, run_dir, total_steps, resume)


def _train(recipe: RMRecipe, group: WorkerGroup, run_dir: Path, total_steps: int, resume: bool) -> dict:
    construct_learners(group, RMLearner, recipe, total_steps)
    world = len(group)
    info = group.call("info")[0]
    step = resume_step(group, run_dir, resume)
    print(f"align rm: {info['model_class']}, {info['parameters'] / 1e6:.2f}M parameters, "
          f"{'MoE (balance losses on)' if info['moe'] else 'dense'}, {recipe.train.loss} loss, {world} x DeepSpeed "
          f"ZeRO-{recipe.deepspeed.zero_stage} on {info['backend']}, {info['rows']} rows, "
          f"{info['heldout_rows']} held-out, {total_steps} steps" +
          (f", resumed at step {step}" if step else ""))

    def evaluate() -> dict[str, float]:
        return heldout_metrics(recipe.train.loss, group.call("evaluate")) if info["heldout_rows"] else {}

    log = MetricsLog(run_dir)
    before = evaluate()
    if before:
        log.log(step, before)
        print(f"align rm: before training: {describe_heldout(before)}")
    first = last = None
    train_seconds = 0.0
    bar = tqdm(total=total_steps, initial=step, desc="rm", unit="step", dynamic_ncols=True)
    try:
        with RunControl("align rm", recipe.train.max_nonfinite_in_row) as control:
            while step < total_steps:
                started = time.perf_counter()
                last = reduce_metrics(group.call("train_step"), time.perf_counter() - started)
                step += 1
                train_seconds += last["step_s"]
                first = first or last
                if recipe.train.eval_every and step % recipe.train.eval_every == 0 and step < total_steps:
                    last.update(evaluate())
                if step % recipe.output.log_every == 0:
                    log.log(step, last)
                bar.update(1)
                bar.set_postfix(loss=f"{last['rm_loss']:.3f}", acc=f"{last.get('accuracy', math.nan):.2f}",
                                epoch=f"{last['epoch']:.2f}")
                control.after_step(step, last["skipped_updates"], recipe.output.save_every,
                                   lambda s: save_checkpoint(group, run_dir, s, recipe.output.keep_last))
            after = evaluate()
            if after:
                log.log(step, after)
    finally:
        bar.close()
        log.close()
    if last is None:
        raise RuntimeError("no training step ran (max_steps reached already?)")
    save_checkpoint(group, run_dir, step, recipe.output.keep_last)
    final = export_model(group, run_dir)
    plot = plot_curves(run_dir / "metrics.jsonl", ["rm_loss", "accuracy", "margin", "heldout/accuracy"],
                       run_dir / "loss.png", f"align rm: {run_dir.name}")
    summary = {"steps": step, "first_loss": first["rm_loss"], "final_loss": last["rm_loss"],
               "final_train_accuracy": last.get("accuracy"), "heldout_before": before, "heldout_after": after,
               "train_seconds": train_seconds, "model": str(final), "plot": str(plot), "run_dir": str(run_dir)}
    report = describe_heldout(after, before) if after else "no held-out set"
    print(f"align rm: done, {step} steps in {train_seconds:.0f}s, loss {first['rm_loss']:.3f} -> "
          f"{last['rm_loss']:.3f}; {report}; model: {final}; curves: {plot}")
    return summary
