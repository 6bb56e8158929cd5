"""GRPO throughput: `align grpo` against TRL's GRPOTrainer on the same model, prompts, G, lengths, batch and steps.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_grpo.py [--steps 20] [--warmup 3] [--model DIR] \
        [--zero-stage 2] [--out runs/bench_grpo.json]

A smoke run, `--steps 4 --warmup 1`, took 65-80 s here (2 cores, start-up included); each further step
adds about 2 s per side. The two sides run one after the other, each in its own subprocess tree with one
torch thread per process:
- align: the real `align grpo RECIPE` command: 1 DeepSpeed learner (ZeRO-`--zero-stage`; one learner has
  nothing to shard) and 1 torch rollout engine, each a Ray actor: 2 worker processes plus the driver. The
  driver is synchronous (rollout, then update, then weight sync), so the two actors never run at once.
- TRL: GRPOTrainer in 1 process, generating with transformers' `generate()` (no vLLM) on the policy itself,
  so it has no weight sync.

Both sides start from the same weights: `--model DIR` (e.g. runs/demo-sft/final), or else the tiny DeepSeek-V2
MoE `--preset` (deepseek-v2-tiny, tokenizer `--tokenizer` data/tokenizer-tiny, fresh weights from `--seed`,
built by align's own `build_model`) saved once with its tokenizer to a temporary directory, which both load
(TRL needs a path anyway when beta > 0, to build its reference model). The recipe (`--recipe`, default
recipes/grpo-tiny.yaml) gives the data, rewards and optimizer settings. One optimizer step = 8 prompts x G=8
completions of at most 64 new tokens at temperature 1.0, one micro-batch of 64 rows (align:
train.micro_batch_size=64; TRL: per_device_train_batch_size=64 completions, num_generations=8, so
generation_batch_size=64 and steps_per_generation=1), beta 0.04 (k3 KL to a frozen reference), clip 0.2, one
policy update per batch (TRL num_iterations=1), per-sequence token mean (align seq_mean_token_mean == TRL
loss_type "grpo"), advantages scaled by the group std, constant learning rate equal to the recipe's, AdamW
with the recipe's betas, clipping at the recipe's max_grad_norm, no gradient checkpointing, fp32. Both score
with align's reward functions (`rewards.registry`, math_answer in the recipe), TRL through a wrapper that
passes the assistant text and the dataset's `answer` column. Every run checks that TRL's prompt tokens equal
align's on the first rows (`prompt_check` in the JSON).

Measured over the steady-state steps (after `--warmup`): completions/s and completion tokens/s = their
totals / total wall time of those steps (not a mean of per-step rates). Step wall time: align, the time
between consecutive metric records of the driver (TensorBoard's wall clock: the whole loop, decoding and
logging included; the driver's own `step_s` is the sum of its phases and leaves those out); TRL, the time
between consecutive `on_step_end` callbacks (batch fetch, generation, scoring, forward, backward, optimizer).
Phases: align's `time/*_s` of metrics.jsonl; TRL's by timing its methods: `_generate` (tokenize, generate,
decode), `_calculate_rewards`, the reference model's `_get_per_token_logps_and_entropies`, the rest of
`_generate_and_score_completions` (padding, advantages), and the rest of the step (the policy update).

Not equal, and not removable from outside the two programs:
- Sampling: the prompts drawn (each side's own seeded order over the same file) and the completions differ,
  so completion lengths differ; completions/s moves with length, tokens/s less so: both are reported.
- align also computes DeepSeek-V2's three balance losses from the router logits; TRL adds none for this
  model (transformers' DeepSeek-V2 computes no auxiliary loss, so TRL's `router_aux_loss_coef` is 0).
- align's learner computes logits on every position; TRL only on completion positions (`logits_to_keep`),
  and TRL also computes the entropy of every completion token in its loss forward.
- align ships weights from the learner to the rollout engine each step (the sync phase); TRL generates
  with the policy it trains.
- The same AdamW, but TRL steps it with its default fused kernel (`adamw_torch_fused`); align with
  `torch.optim.AdamW` inside DeepSpeed.

Prints a table (side, completions and tokens per step, step time, completions/s, tokens/s), the ratio
align / TRL in completions/s against the target (>= 2x), seconds per phase, and writes all as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_sft import run_logged, versions

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.0
PROMPT_CHECK_ROWS = 200
# The benchmark's settings on top of the recipe, for both sides (the model path and steps are added per run).
BENCH_OVERRIDES = [
    "cluster.num_workers=1", "cluster.threads_per_worker=1", "rollout.num_workers=1", "rollout.threads_per_worker=1",
    "rollout.engine=torch", "algorithm.prompts_per_step=8", "algorithm.group_size=8", "train.micro_batch_size=64",
    "rollout.max_new_tokens=64", "rollout.temperature=1.0", "rollout.top_p=1.0", "algorithm.kl_coef=0.04",
    "algorithm.clip_eps=0.2", "algorithm.aggregation=seq_mean_token_mean", "algorithm.advantage_scale=group",
    "algorithm.updates_per_batch=1", "algorithm.truncated=none", "algorithm.dynamic_sampling=false",
    "train.schedule=constant", "train.warmup_steps=0",
    "data.heldout=null", "model.dtype=float32", "deepspeed.precision=fp32", "output.save_every=0",
]
# align's loss aggregation -> TRL's loss_type of the same formula (align's token mean is over the whole batch).
TRL_LOSS_TYPES = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "seq_mean_token_sum_norm": "dr_grpo"}
LABELS = {"align": "align grpo (1 learner + 1 rollout actor, Ray)", "trl": "TRL GRPOTrainer (1 process)"}
# Rows of the phase table: label, align's phase, TRL's phase (None: the side has no such phase).
PHASES = [
    ("generation", "rollout_s", "generate_s"),
    ("rewards", "rewards_s", "rewards_s"),
    ("advantages (TRL: + batch padding)", "advantages_s", "advantages_s"),
    ("reference log-probs (align: in update)", None, "ref_logps_s"),
    ("policy update (TRL: + batch fetch, logging)", "update_s", "update_s"),
    ("weight sync to the rollout engine", "sync_s", None),
    ("other (decode, metrics logging)", "other_s", None),
]


def steady(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Totals over the steps after `warmup` (records are per step, numbered from 1): rates are total / total."""
    measured = [r for r in records if r["step"] > warmup]
    if not measured:
        raise RuntimeError(f"{len(records)} steps logged, none after the {warmup} warm-up steps")
    seconds = sum(r["step_s"] for r in measured)
    completions, tokens = sum(r["completions"] for r in measured), sum(r["tokens"] for r in measured)
    phases = sorted({key for r in measured for key in r["phases"]})
    return {"steps_measured": len(measured), "step_s": seconds / len(measured),
            "completions_per_step": completions / len(measured), "tokens_per_step": tokens / len(measured),
            "completion_length": tokens / completions, "completions_per_s": completions / seconds,
            "tokens_per_s": tokens / seconds,
            "phases_s": {key: sum(r["phases"].get(key, 0.0) for r in measured) / len(measured) for key in phases}}


def bench_overrides(model_dir: str, steps: int, zero_stage: int) -> list[str]:
    return [*BENCH_OVERRIDES, f"model.path={model_dir}", f"algorithm.steps={steps}",
            f"deepspeed.zero_stage={zero_stage}"]


def save_fresh_model(preset: str, tokenizer_dir: str, seed: int, directory: Path) -> None:
    """A preset model with fresh weights from `seed` (align's own builder), saved with its tokenizer."""
    from align.config.schema import ModelConfig
    from align.models.loading import build_model, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    build_model(ModelConfig(preset=preset, tokenizer=tokenizer_dir, seed=seed), tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# ---- align: the real `align grpo` command ----

def align_executable() -> str:
    align_bin = Path(sys.executable).with_name("align")
    return str(align_bin) if align_bin.exists() else shutil.which("align") or "align"


def record_times(tensorboard_dir: Path) -> dict[int, float]:
    """Wall-clock time of each step's metric record (the driver logs a step right after it ends)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times: dict[int, float] = {}
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.summary.value:
                times[event.step] = min(times.get(event.step, event.wall_time), event.wall_time)
    return times


def bench_align(recipe: str, overrides: list[str], warmup: int, work: Path) -> dict[str, Any]:
    run_dir = work / "align-run"
    command = [align_executable(), "grpo", recipe, *overrides, f"output.dir={run_dir}"]
    started = time.perf_counter()
    run_logged(command, work / "align.log")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged_at = record_times(run_dir / "tensorboard")
    records = []
    for m in metrics[1:]:  # step 1 has no previous record to measure its wall time from
        step_s = logged_at[m["step"]] - logged_at[m["step"] - 1]
        phases = {key.removeprefix("time/"): value for key, value in m.items() if key.startswith("time/")}
        phases["other_s"] = step_s - sum(phases.values())
        completions = round(m["completions_per_s"] * m["step_s"])
        records.append({"step": m["step"], "step_s": step_s, "completions": completions,
                        "tokens": round(m["completion_length"] * completions), "phases": phases})
    last = metrics[-1]
    return {**steady(records, warmup), "command": " ".join(command), "process_s": time.perf_counter() - started,
            # the driver's own step time (sum of its phases) and the learner's compute inside the update phase
            "driver_step_s": sum(m["step_s"] for m in metrics[warmup:]) / len(metrics[warmup:]),
            "learner_update_s": sum(m["update_s"] for m in metrics[warmup:]) / len(metrics[warmup:]),
            "final": {"reward": last["reward/mean"], "kl": last.get("kl"), "loss": last.get("loss")}}


# ---- TRL, run in a subprocess of its own (`--trl-worker`) ----

def trl_reward(name: str, args: dict[str, Any]) -> Callable[..., list[float]]:
    """One of align's rewards in TRL's signature: conversational completions are [{"role", "content"}] lists,
    dataset columns arrive as keyword lists (the reference answers as `answer`)."""
    from rewards.base import Sample
    from rewards.registry import build

    reward = build(name, args)

    def score(prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward([Sample(p, t, {"answer": a}) for p, t, a in zip(prompts, texts, answer)])

    score.__name__ = name.replace(":", ".")
    return score


def trl_config(recipe: Any, steps: int, output_dir: Path) -> Any:
    """GRPOConfig with the recipe's algorithm, batch and optimizer; raises where TRL has no equal setting."""
    from trl import GRPOConfig

    algo, rollout, train = recipe.algorithm, recipe.rollout, recipe.train
    if algo.truncated == "penalty" or algo.tis_cap is not None or algo.dynamic_sampling or train.schedule != "constant":
        raise ValueError("no TRL equivalent for truncated=penalty, tis_cap, dynamic_sampling or a decaying schedule")
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=steps, gradient_accumulation_steps=1,
        per_device_train_batch_size=algo.prompts_per_step * algo.group_size, num_generations=algo.group_size,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature, top_p=rollout.top_p, top_k=0, use_vllm=False, beta=algo.kl_coef,
        epsilon=algo.clip_eps, epsilon_high=algo.clip_eps_high, num_iterations=algo.updates_per_batch,
        loss_type=TRL_LOSS_TYPES[algo.aggregation], scale_rewards=algo.advantage_scale,
        importance_sampling_level=algo.ratio_level, mask_truncated_completions=algo.truncated == "mask",
        reward_weights=[spec.weight for spec in recipe.rewards], learning_rate=train.lr, lr_scheduler_type="constant",
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay, adam_beta1=train.betas[0],
        adam_beta2=train.betas[1], max_grad_norm=train.max_grad_norm, seed=train.seed,
        model_init_kwargs={"dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation},
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True)


def trl_worker(recipe_path: str, overrides: list[str], steps: int, result_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from align.config import load_grpo_recipe
    from align.data.prompts import load_prompts
    from align.models.loading import load_tokenizer

    torch.set_num_threads(1)
    recipe = load_grpo_recipe(recipe_path, overrides)
    data = recipe.data
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
    prompts = load_prompts(data.train, tokenizer, data.prompt_key, data.answer_key, data.max_prompt_length)

    class StepClock(TrainerCallback):
        """Per-step wall time, phase times and completion counts, closed at each `on_step_end`."""

        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []
            self.current: dict[str, float] = defaultdict(float)
            self.last_end = 0.0
            self.logs: list[dict[str, Any]] = []

        @contextmanager
        def phase(self, name: str) -> Iterator[None]:
            started = time.perf_counter()
            yield
            self.current[name] += time.perf_counter() - started

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_end = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            step_s, c = now - self.last_end, self.current
            scoring = c["generate_and_score_s"]
            phases = {"generate_s": c["generate_s"], "rewards_s": c["rewards_s"], "ref_logps_s": c["ref_logps_s"],
                      "advantages_s": scoring - c["generate_s"] - c["rewards_s"] - c["ref_logps_s"],
                      "update_s": step_s - scoring}
            self.records.append({"step": state.global_step, "step_s": step_s, "completions": int(c["completions"]),
                                 "tokens": int(c["tokens"]), "phases": phases})
            self.current, self.last_end = defaultdict(float), now

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            self.logs.append(dict(logs or {}))

    clock = StepClock()

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its phases timed; the computation is TRL's own."""

        def _generate(self, prompts: list) -> tuple:
            with clock.phase("generate_s"):
                result = super()._generate(prompts)
            completion_ids = result[1]
            clock.current["completions"] += len(completion_ids)
            clock.current["tokens"] += sum(len(ids) for ids in completion_ids)
            return result

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            with clock.phase("rewards_s"):
                return super()._calculate_rewards(*args, **kwargs)

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            with clock.phase("generate_and_score_s"):
                return super()._generate_and_score_completions(inputs)

        def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> Any:
            if model is not self.ref_model:
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            with clock.phase("ref_logps_s"):
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    config = trl_config(recipe, steps, result_path.parent / "trl-out")
    if config.generation_batch_size != recipe.algorithm.prompts_per_step * recipe.algorithm.group_size \
            or config.steps_per_generation != 1:
        raise RuntimeError(f"TRL would generate {config.generation_batch_size} completions every "
                           f"{config.steps_per_generation} steps, not one batch per step")
    trainer = TimedGRPOTrainer(
        model=recipe.model.path, reward_funcs=[trl_reward(spec.name, spec.args) for spec in recipe.rewards],
        args=config, train_dataset=Dataset.from_list([{"prompt": p.messages, "answer": p.answer} for p in prompts]),
        processing_class=tokenizer, callbacks=[clock])
    checked = prompts[:PROMPT_CHECK_ROWS]
    theirs = trainer._tokenize_prompts([p.messages for p in checked])[0]
    if [list(ids) for ids in theirs] != [p.token_ids for p in checked]:
        raise RuntimeError("TRL and align tokenize the prompts differently")
    trainer.train()

    step_logs = [log for log in clock.logs if "reward" in log]  # one per step (logging_steps=1), then a summary
    last = step_logs[-1]
    result_path.write_text(json.dumps({
        "records": clock.records, "prompt_check": f"TRL prompt tokens == align's on {len(checked)}/{len(checked)} rows",
        "final": {"reward": last["reward"], "kl": last.get("kl"), "loss": last.get("loss")},
        # TRL's own `step_time` (its training_step: generation, scoring, forward, backward; no optimizer step).
        "trl_logged_step_time": [log.get("step_time") for log in step_logs],
        "trl_config": {key: getattr(config, key) for key in (
            "per_device_train_batch_size", "num_generations", "generation_batch_size", "steps_per_generation",
            "max_completion_length", "temperature", "beta", "epsilon", "loss_type", "scale_rewards",
            "num_iterations", "learning_rate", "lr_scheduler_type", "gradient_checkpointing", "use_vllm")},
        "optimizer": str(config.optim)}))


def bench_trl(recipe: str, overrides: list[str], steps: int, warmup: int, work: Path) -> dict[str, Any]:
    result_path = work / "trl.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", "--recipe", recipe,
               "--steps", str(steps), "--result", str(result_path), "--", *overrides]
    started = time.perf_counter()
    run_logged(command, work / "trl.log")
    result = json.loads(result_path.read_text())
    records = result.pop("records")
    return {**steady(records, warmup), **result, "process_s": time.perf_counter() - started}


# ---- the driver ----

def print_tables(results: dict[str, dict[str, Any]]) -> float:
    """The throughput table and the phase table; returns align / TRL in completions/s."""
    print(f"\n{'side':<46} {'compl/step':>10} {'tok/step':>9} {'step s':>7} {'compl/s':>8} {'tokens/s':>9}")
    for side, r in results.items():
        print(f"{LABELS[side]:<46} {r['completions_per_step']:>10.0f} {r['tokens_per_step']:>9.0f} "
              f"{r['step_s']:>7.3f} {r['completions_per_s']:>8.1f} {r['tokens_per_s']:>9.0f}")
    ours, theirs = results["align"], results["trl"]
    ratio = ours["completions_per_s"] / theirs["completions_per_s"]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"\nalign / TRL = {ratio:.2f}x in completions/s (target >= {TARGET_RATIO}x: {verdict}), "
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x in tokens/s "
          f"(mean completion length: align {ours['completion_length']:.1f}, TRL {theirs['completion_length']:.1f})")
    print(f"\n{'seconds per step':<46} {'align':>8} {'%':>5} {'TRL':>8} {'%':>5}")
    for label, our_key, their_key in PHASES:
        cells = []
        for r, key in ((ours, our_key), (theirs, their_key)):
            seconds = r["phases_s"].get(key) if key else None
            cells.append(f"{seconds:>8.3f} {100 * seconds / r['step_s']:>5.0f}" if seconds is not None
                         else f"{'-':>8} {'':>5}")
        print(f"{label:<46} {cells[0]} {cells[1]}")
    print(f"{'step':<46} {ours['step_s']:>8.3f} {100:>5} {theirs['step_s']:>8.3f} {100:>5}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the measurement")
    parser.add_argument("--model", help="checkpoint directory both sides start from (default: fresh preset weights)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3],
                        help="align's DeepSpeed ZeRO stage (0 is refused in fp32: it has no non-finite check)")
    parser.add_argument("--recipe", default="recipes/grpo-tiny.yaml", help="GRPO recipe giving data, rewards and lr")
    parser.add_argument("--preset", default="deepseek-v2-tiny", help="model preset when --model is not given")
    parser.add_argument("--tokenizer", default="data/tokenizer-tiny", help="tokenizer of the preset model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the preset model's fresh weights")
    parser.add_argument("--out", default="runs/bench_grpo.json", help="where to write the results as JSON")
    parser.add_argument("--overlap", action="store_true",
                        help="align samples batch s+1 while updating on batch s (algorithm.max_staleness=1)")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args.recipe, args.overrides, args.steps, args.result)
        return
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need 1 <= --warmup < --steps")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            model_dir = str(work / "model")
            save_fresh_model(args.preset, args.tokenizer, args.seed, Path(model_dir))
        overrides = bench_overrides(model_dir, args.steps, args.zero_stage)
        for side in ("align", "trl"):
            print(f"bench_grpo: {side}: {args.steps} steps ({args.warmup} warm-up) ...", flush=True)
            align_overrides = [*overrides, f"algorithm.max_staleness={int(args.overlap)}"]
            results[side] = bench_align(args.recipe, align_overrides, args.warmup, work) if side == "align" \
                else bench_trl(args.recipe, overrides, args.steps, args.warmup, work)
            r = results[side]
            print(f"bench_grpo: {side}: {r['completions_per_s']:.1f} completions/s, {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['step_s']:.3f} s/step ({r['process_s']:.0f} s in all)"
                  + (f"; {r['prompt_check']}" if "prompt_check" in r else ""), flush=True)
    ratio = print_tables(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {"steps": args.steps, "warmup": args.warmup,
                     "model": args.model or f"fresh {args.preset}, seed {args.seed}", "recipe": args.recipe,
                     "overrides": overrides, "zero_stage": args.zero_stage, "align_max_staleness": int(args.overlap),
                     "threads_per_process": 1, "cpu_count": os.cpu_count(),
                     "processes": {"align": "driver + 1 learner actor + 1 rollout actor (Ray), "
                                            + ("sampling overlapped with the update" if args.overlap
                                               else "run one at a time"),
                                   "trl": "1 process"},
                     "target_align_over_trl_completions_per_s": TARGET_RATIO},
        "versions": versions(), "labels": LABELS, "results": results,
        "ratios": {"completions_per_s": ratio,
                   "tokens_per_s": results["align"]["tokens_per_s"] / results["trl"]["tokens_per_s"]},
    }, indent=2))
    print(f"bench_grpo: results in {out}")


if __name__ == "__main__":
    main()
