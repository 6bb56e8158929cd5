"""Time `PromptSampler` on a DeepSeek-V2-sized prompt set: 1.5M prompts, 512 drawn per step.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_prompt_sampler.py [--prompts 1500000] [--per-step 512]

Prints the first step (it shuffles the epoch's permutation once) and the mean of the next ones.
"""

from __future__ import annotations

import argparse
import time

from align.data.prompts import PromptSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1_500_000)
    parser.add_argument("--per-step", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sampler = PromptSampler(list(range(args.prompts)), seed=0)  # the sampler only indexes its prompts
    started = time.perf_counter()
    sampler.next(args.per_step)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        sampler.next(args.per_step)
    rest = (time.perf_counter() - started) / args.steps
    print(f"{args.prompts} prompts, {args.per_step} per step: first step {first:.2f} s (the epoch's shuffle), "
          f"then {rest * 1e3:.2f} ms per step")


if __name__ == "__main__":
    main()
