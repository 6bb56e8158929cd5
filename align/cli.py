"""The `align` command: `align sft|grpo|rm RECIPE [section.key=value ...] [--resume]`, `align eval MODEL`.

Exit codes: 0 done; 1 the run failed (a worker, the rewards, non-finite updates; the message says which and
where the last checkpoint is); 2 bad recipe or data, before anything started; 128 + signal number when
stopped by Ctrl-C (130) or SIGTERM (143) after saving a checkpoint."""

from __future__ import annotations

import argparse
import os
import sys

from align.config import RecipeError, SFTRecipe, load_grpo_recipe, load_recipe, load_sft_recipe
from align.config.grpo_schema import GRPORecipe
from align.data.sources import DataError

# One BLAS thread per process unless the user says otherwise (contended vCPUs stall with more).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align", description="SFT and GRPO for DeepSeek-V2-style models")
    commands = parser.add_subparsers(dest="command", required=True)
    sft = commands.add_parser("sft", help="supervised fine-tuning on chat data")
    sft.add_argument("recipe", help="YAML recipe (see recipes/)")
    sft.add_argument("overrides", nargs="*", help="section.key=value changes to the recipe (anywhere on the line)")
    sft.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    sft.add_argument("--check", action="store_true", help="validate the recipe and data, then exit")
    sft.add_argument("--plan", action="store_true",
                     help="print parameter counts and per-learner memory (model built on the meta device), then exit")
    grpo = commands.add_parser("grpo", help="GRPO reinforcement learning from a policy checkpoint")
    grpo.add_argument("recipe", help="YAML recipe (see recipes/)")
    grpo.add_argument("overrides", nargs="*", help="section.key=value changes to the recipe (anywhere on the line)")
    grpo.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    grpo.add_argument("--check", action="store_true",
                      help="validate the recipe, prompts and rewards, name the rollout engine, then exit")
    rm = commands.add_parser("rm", help="train a reward model (pairwise or point-wise) from a causal LM")
    rm.add_argument("recipe", help="YAML recipe (see recipes/)")
    rm.add_argument("overrides", nargs="*", help="section.key=value changes to the recipe (anywhere on the line)")
    rm.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    rm.add_argument("--check", action="store_true", help="validate the recipe and data, then exit")
    evaluate = commands.add_parser("eval", help="held-out math accuracy of a model (greedy decoding)")
    evaluate.add_argument("model", help="HF checkpoint directory, or a preset name for an untrained baseline")
    evaluate.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    evaluate.add_argument("--data", default="data/sft-tiny/heldout.jsonl", help="JSONL rows with prompt, answer")
    evaluate.add_argument("--limit", type=int, default=200, help="problems to score")
    evaluate.add_argument("--max-new-tokens", type=int, default=128)
    evaluate.add_argument("--show", type=int, default=3, help="completions to print")
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg or args.command == "eval"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("sft", "grpo", "rm"):
        args.overrides = [*args.overrides, *extra]
    if args.command == "eval":
        return run_eval(args)

    import ray

    joined = ray.is_initialized()  # called from a program that runs Ray already: leave it running
    try:
        if args.command == "grpo":
            recipe = load_grpo_recipe(args.recipe, args.overrides)
            if args.check:
                return check_grpo(args.recipe, recipe)
            from align.trainers.grpo import run_grpo

            run_grpo(recipe, resume=args.resume)
            return 0
        if args.command == "rm":
            return run_rm_command(args)
        if args.plan:  # planning needs the model's shape only, not the data or the weights
            from align.config.checks import check_architecture

            recipe = load_recipe(SFTRecipe, args.recipe, args.overrides)
            check_architecture(recipe.model, args.recipe, for_plan=True)
            return print_plan(recipe)
        recipe = load_sft_recipe(args.recipe, args.overrides)
        if args.check:
            from align.data.stream import preflight
            from align.models.loading import load_tokenizer

            stats = preflight(recipe.data, load_tokenizer(recipe.model.tokenizer or recipe.model.path))
            print(f"align: {args.recipe} is valid ({stats['total_rows']} rows, "
                  f"{stats['mean_tokens']:.0f} tokens per sample on average)")
            return 0
        from align.trainers.sft import run_sft

        run_sft(recipe, resume=args.resume)
    except (RecipeError, DataError, FileExistsError) as err:
        print(f"align: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted (no checkpoint written for the step in progress)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a run failure is reported in one line, not a traceback
        from align.distributed.worker_group import WorkerError
        from align.trainers.grpo import RewardFailure
        from align.trainers.run_control import NonFiniteUpdates, RunInterrupted

        if isinstance(err, RunInterrupted):
            print(f"align: {err}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, (WorkerError, RewardFailure, NonFiniteUpdates)):
            print(f"align: error: {err}", file=sys.stderr)
            return 1
        raise
    finally:
        if ray.is_initialized() and not joined:
            ray.shutdown()
    return 0


def run_rm_command(args: argparse.Namespace) -> int:
    from align.config.checks import load_rm_recipe

    recipe = load_rm_recipe(args.recipe, args.overrides)
    if args.check:
        from align.data.preferences import preflight
        from align.models.loading import load_tokenizer

        stats = preflight(recipe.data, recipe.train.loss, load_tokenizer(recipe.model.tokenizer or recipe.model.path))
        print(f"align: {args.recipe} is valid ({stats['total_rows']} rows, {stats['heldout_rows']} held-out, "
              f"{stats['mean_tokens']:.0f} tokens per scored sequence on average)")
        return 0
    from align.trainers.rm import run_rm

    run_rm(recipe, resume=args.resume)
    return 0


def check_grpo(source: str, recipe: GRPORecipe) -> int:
    """Tokenize every prompt (errors name file:line) and report what a run would use."""
    from align.data.prompts import load_prompt_sets
    from align.models.loading import load_tokenizer
    from rollout.engines import choose_engine

    prompts = load_prompt_sets(recipe.data, load_tokenizer(recipe.model.tokenizer or recipe.model.path))
    engine = choose_engine(recipe.rollout.engine, recipe.model, on_gpu=recipe.rollout.gpus_per_worker > 0)
    skipped = f", {len(prompts.skipped)} bad rows skipped" if prompts.skipped else ""
    print(f"align: {source} is valid ({len(prompts.train)} prompts{skipped}, {len(prompts.heldout)} held-out; "
          f"rollout engine: {engine}; policy, reference and engines compute in {recipe.policy_dtype}; "
          f"rewards: {', '.join(spec.name for spec in recipe.rewards)})")
    return 0


def print_plan(recipe: object) -> int:
    from align.models.plan import plan_recipe

    plan = plan_recipe(recipe.model, recipe.lora, recipe.deepspeed, recipe.cluster.num_workers, None)
    counts, memory = plan["counts"], plan["memory"]
    ds = recipe.deepspeed
    active = f", {counts['active'] / 1e9:.2f}B active per token" if "active" in counts else ""
    print(f"align plan: {plan['model_type']}, {counts['total'] / 1e9:.2f}B parameters{active}, "
          f"{memory.trainable / 1e9:.3f}B trainable")
    print(f"  per learner ({recipe.cluster.num_workers} learners, ZeRO-{ds.zero_stage}, {ds.precision}"
          f"{', optimizer offloaded' if ds.offload_optimizer else ''}): weights {memory.weights_gib:.1f} GiB, "
          f"grads {memory.grads_gib:.1f} GiB, optimizer {memory.optimizer_gib:.1f} GiB on device"
          f" + {memory.offloaded_gib:.1f} GiB on host; {memory.device_gib:.1f} GiB before activations")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from align.config.schema import ModelConfig
    from align.evaluate import load_problems, math_accuracy
    from align.models.loading import build_model, load_tokenizer
    from align.models.presets import PRESETS

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    is_preset = args.model in PRESETS
    config = ModelConfig(preset=args.model if is_preset else None, path=None if is_preset else args.model,
                         tokenizer=args.tokenizer)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = build_model(config, tokenizer)
    accuracy, results = math_accuracy(model, tokenizer, load_problems(args.data, args.limit), args.max_new_tokens)
    for result in results[: args.show]:
        print(f"  answer {result['answer']!r:>8} predicted {result['predicted']!r:>8}  "
              f"{result['completion'][:120]!r}")
    correct = sum(r["correct"] for r in results)
    print(f"align eval: {args.model}: {correct}/{len(results)} correct ({accuracy:.1%}) on {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
