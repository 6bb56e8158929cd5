"""Build the small data sets shipped in data/: sft-tiny, math-tiny and PROVENANCE.md.

The tiny DeepSeek-V2 (about 5M parameters, a few CPU minutes of SFT) has to be able to learn part of the
arithmetic, or GRPO afterwards has no reward signal to amplify. So the default tasks are the easiest
reasoning-gym generators with a knob each: chain sums of 2-3 numbers of 1-2 digits and leg counting
word problems with 2-3 kinds of animals, 1-5 of each. reasoning-gym gives no chain of thought for them,
so one is written here: one small operation per line ("47 + 8 = 55"), then `#### N`. English
chatterbot-corpus conversations (multi-turn kept whole) make the rows chat-shaped. Measured with the
deepseek-v2-tiny preset (about 1M parameters) at the sft-tiny recipe's batch and learning rate, greedy
accuracy on sft-tiny/heldout was about 3% after 1-2 epochs, 36% after 3 and 69% after 4: the defaults
are learnable, but only past about 1000 steps, and the two-digit three-term sums leave room for GRPO.

All four splits are drawn from seeds 10**7 apart (reasoning-gym seeds item idx with `seed + idx`, so
nearby seeds would replay the same items) and deduplicated on question text across splits, held-out
sets first, so each held-out set is an unbiased sample and training never sees its questions.

Run from the repository root:  .venv/bin/python scripts/build_tiny_data.py
The same arguments give byte-identical files.
"""

import argparse
import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import chatterbot_corpus
import reasoning_gym
import yaml
from reasoning_gym.arithmetic.leg_counting import ANIMALS

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PROMPT = "You are a helpful assistant."
SEED_STRIDE = 10**7  # > any split's draws, so reasoning-gym's `seed + idx` ranges never overlap
MAX_DRAWS_PER_SPLIT = 10**6
DEFAULT_MIX = "chain_sum=0.7,leg_counting=0.3"

Message = dict[str, str]
Row = dict[str, Any]


@dataclass(frozen=True)
class Difficulty:
    """The knobs that decide how hard the arithmetic is (see --help)."""

    max_digits: int
    max_terms: int
    max_animal_count: int


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: the question as asked, a step-by-step solution ending in `#### N`, and N."""

    question: str
    solution: str
    answer: str
    source: str


def running_sum_lines(first: int, steps: list[tuple[str, int]]) -> tuple[list[str], int]:
    """One `a op b = c` line per operation: a tiny model learns one small sum far more easily than a chain."""
    lines, total = [], first
    for op, value in steps:
        new_total = total + value if op == "+" else total - value
        lines.append(f"{total} {op} {value} = {new_total}")
        total = new_total
    return lines, total


def finish_solution(lines: list[str], total: int, expected: str, source: str) -> str:
    """Append the `#### N` line, refusing a solution whose result disagrees with reasoning-gym's answer."""
    if str(total) != expected:
        raise ValueError(f"{source}: worked solution gives {total}, reasoning-gym says {expected}")
    return "\n".join([*lines, f"#### {total}"])


def chain_sum_problem(item: dict[str, Any]) -> Problem | None:
    """`47 + 8 - 23`: fold left to right, one line per operator."""
    tokens = item["metadata"]["expression"].split()
    steps = [(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2)]
    lines, total = running_sum_lines(int(tokens[0]), steps)
    solution = finish_solution(lines, total, item["answer"], "chain_sum")
    return Problem(item["question"].strip(), solution, item["answer"], "reasoning_gym/chain_sum")


def leg_counting_problem(item: dict[str, Any]) -> Problem | None:
    """Legs per kind of animal (a product from a small table), then the running sum of those."""
    counts: dict[str, int] = item["metadata"]["animals"]
    lines, subtotals = [], []
    for animal, count in counts.items():
        legs = count * ANIMALS[animal]
        lines.append(f"{animal}: {count} * {ANIMALS[animal]} = {legs} legs")
        subtotals.append(legs)
    sum_lines, total = running_sum_lines(subtotals[0], [("+", legs) for legs in subtotals[1:]])
    solution = finish_solution(lines + sum_lines, total, item["answer"], "leg_counting")
    return Problem(item["question"].strip(), solution, item["answer"], "reasoning_gym/leg_counting")


def gsm_symbolic_problem(item: dict[str, Any]) -> Problem | None:
    """GSM8K-style word problems carry their own chain of thought; keep only integer answers."""
    answer = item["answer"].replace(",", "")
    solution = item["metadata"]["answer_cot"].strip()
    if not answer.lstrip("-").isdigit() or not solution.endswith(f"#### {answer}"):
        return None
    return Problem(item["question"].strip(), solution, answer, "reasoning_gym/gsm_symbolic")


FORMATTERS: dict[str, Callable[[dict[str, Any]], Problem | None]] = {
    "chain_sum": chain_sum_problem,
    "leg_counting": leg_counting_problem,
    "gsm_symbolic": gsm_symbolic_problem,
}


def dataset_config(name: str, difficulty: Difficulty) -> dict[str, Any]:
    """reasoning-gym config for one generator at the chosen difficulty (gsm_symbolic has no knob)."""
    if name == "chain_sum":
        return {"min_terms": 2, "max_terms": difficulty.max_terms, "min_digits": 1,
                "max_digits": difficulty.max_digits, "allow_negation": False}
    if name == "leg_counting":
        return {"min_animals": 2, "max_animals": difficulty.max_terms, "min_instances": 1,
                "max_instances": difficulty.max_animal_count}
    return {"difficulty": 1.0}


def question_key(question: str) -> str:
    """Dedupe key: the question with whitespace runs collapsed."""
    return " ".join(question.split())


def draw_problems(mix: dict[str, float], difficulty: Difficulty, seed: int, count: int,
                  taken: set[str]) -> list[Problem]:
    """Draw `count` problems whose questions are not in `taken` (updated in place). The generator is chosen
    per kept problem, so the mix holds even when an easy generator keeps repeating questions."""
    datasets = {name: reasoning_gym.create_dataset(name, seed=seed, size=MAX_DRAWS_PER_SPLIT,
                                                   **dataset_config(name, difficulty)) for name in mix}
    next_index = dict.fromkeys(mix, 0)
    chooser = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    problems: list[Problem] = []
    while len(problems) < count:
        name = chooser.choices(names, weights)[0]
        problem = None
        while problem is None or question_key(problem.question) in taken:
            if next_index[name] == MAX_DRAWS_PER_SPLIT:
                raise SystemExit(f"{name}: too few distinct problems at this difficulty; raise it")
            problem = FORMATTERS[name](datasets[name][next_index[name]])
            next_index[name] += 1
        taken.add(question_key(problem.question))
        problems.append(problem)
    return problems


def chatterbot_conversations(language: str = "english") -> list[Row]:
    """Every conversation of one chatterbot-corpus language as alternating user/assistant turns; a
    trailing unanswered user turn is dropped, since SFT learns from assistant turns only."""
    data_dir = Path(chatterbot_corpus.__file__).parent / "data" / language
    rows = []
    for path in sorted(data_dir.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            turns = [str(turn).strip() for turn in conversation]
            turns = turns[: len(turns) // 2 * 2]
            if len(turns) < 2 or not all(turns):
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn}
                        for i, turn in enumerate(turns)]
            rows.append({"messages": messages, "source": f"chatterbot_corpus/{language}/{path.stem}"})
    return rows


def sft_row(problem: Problem) -> Row:
    """A single-turn chat row: the question, answered by the worked solution."""
    messages = [{"role": "user", "content": problem.question},
                {"role": "assistant", "content": problem.solution}]
    return {"messages": messages, "source": problem.source}


def prompt_row(problem: Problem) -> Row:
    """A prompt-only row for evaluation and GRPO: the answer is checked, the solution is not shipped."""
    return {"prompt": [{"role": "user", "content": problem.question}], "answer": problem.answer,
            "source": problem.source}


def add_system_prompts(rows: list[Row], fraction: float, rng: random.Random) -> None:
    """Give a few rows a system turn so the chat template's system branch is trained on too."""
    for row in rows:
        if rng.random() < fraction:
            row["messages"].insert(0, {"role": "system", "content": SYSTEM_PROMPT})


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """One JSON object per line, UTF-8 kept readable, '\\n' line ends on every platform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_mix(text: str) -> dict[str, float]:
    """`chain_sum=0.7,leg_counting=0.3` -> {name: weight}, checking each name is supported."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in FORMATTERS:
            raise argparse.ArgumentTypeError(f"unknown dataset {name!r}; choose from {sorted(FORMATTERS)}")
        mix[name] = float(weight or 1.0)
    return mix


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--seed", type=int, default=1234, help="base seed; splits sit SEED_STRIDE apart")
    parser.add_argument("--datasets", type=parse_mix, default=DEFAULT_MIX,
                        help=f"reasoning-gym generators: weights (default {DEFAULT_MIX}; or gsm_symbolic)")
    parser.add_argument("--max-digits", type=int, default=2, help="chain_sum: digits per number")
    parser.add_argument("--max-terms", type=int, default=3,
                        help="chain_sum: numbers per sum; leg_counting: kinds of animals")
    parser.add_argument("--max-animal-count", type=int, default=5, help="leg_counting: animals of one kind")
    parser.add_argument("--sft-train-rows", type=int, default=20000, help="arithmetic + chat rows in all")
    parser.add_argument("--sft-heldout-rows", type=int, default=500)
    parser.add_argument("--math-train-rows", type=int, default=2000)
    parser.add_argument("--math-heldout-rows", type=int, default=300)
    parser.add_argument("--system-fraction", type=float, default=0.1,
                        help="share of SFT rows that start with a system turn")
    args = parser.parse_args(argv)
    if args.max_terms < 2 or args.max_digits < 1 or args.max_animal_count < 1:
        parser.error("need --max-terms >= 2, --max-digits >= 1, --max-animal-count >= 1")
    return args


def rebuild_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this build, every knob spelled out."""
    mix = ",".join(f"{name}={weight:g}" for name, weight in args.datasets.items())
    return (f".venv/bin/python scripts/build_tiny_data.py --seed {args.seed} --datasets {mix} "
            f"--max-digits {args.max_digits} --max-terms {args.max_terms} "
            f"--max-animal-count {args.max_animal_count} --sft-train-rows {args.sft_train_rows} "
            f"--sft-heldout-rows {args.sft_heldout_rows} --math-train-rows {args.math_train_rows} "
            f"--math-heldout-rows {args.math_heldout_rows} --system-fraction {args.system_fraction:g}")


def file_line(out_dir: Path, name: str, rows: list[Row]) -> str:
    """Markdown bullet naming one file with its size, rows, sources and checksum."""
    path = out_dir / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    sources = ", ".join(f"{source} {n}" for source, n in sorted(Counter(r["source"] for r in rows).items()))
    return (f"- `{name}`: {len(rows)} rows, {path.stat().st_size} bytes, sha256 {digest}...\n"
            f"  ({sources})")


def write_provenance(out_dir: Path, args: argparse.Namespace, files: dict[str, list[Row]]) -> None:
    """data/PROVENANCE.md: what generated each file, under which licence, and how to rebuild it."""
    mix = ", ".join(f"`{name}` {weight:g}" for name, weight in args.datasets.items())
    gsm_note = ("\n- The mix includes `gsm_symbolic`, whose templates are derived from the GSM8K **test** "
                "set (GSM8K is MIT): never report GSM8K-test scores for a model trained on these files."
                if "gsm_symbolic" in args.datasets else "")
    text = f"""# Provenance of the shipped data

Generated by `scripts/build_tiny_data.py`; do not edit by hand. Rebuild (byte-identical) with:

    {rebuild_command(args)}
    .venv/bin/python scripts/build_tiny_tokenizer.py

## Files
{chr(10).join(file_line(out_dir, name, rows) for name, rows in files.items())}
- `tokenizer-tiny/`: byte-level BPE (vocabulary 1024 with specials, digits split one by one) trained by
  `scripts/build_tiny_tokenizer.py` on the text of `sft-tiny/train.jsonl`, with HF `tokenizers`
  {version("tokenizers")}; saved by transformers {version("transformers")}. Rebuild it whenever the data
  change.

## Sources and licences
- Arithmetic: `reasoning-gym` {version("reasoning-gym")} (Apache-2.0), generators and weights {mix}.
  Difficulty: `chain_sum` 2-{args.max_terms} numbers of 1-{args.max_digits} digits, no negative operands;
  `leg_counting` 2-{args.max_terms} kinds of animals, 1-{args.max_animal_count} of each. The step-by-step
  solutions and `#### N` lines are written by the build script (reasoning-gym gives only the answer) and
  checked against reasoning-gym's answer.{gsm_note}
- Chat: English conversations of `chatterbot-corpus` {version("chatterbot-corpus")} (BSD-3-Clause), all of
  them, multi-turn ones kept as multi-turn; a trailing unanswered user turn is dropped.
- A share of {args.system_fraction:g} of the SFT rows start with the system turn "{SYSTEM_PROMPT}".

## Splits
Held-out sets are drawn first (seed {args.seed} + k * {SEED_STRIDE}: k=1 sft-tiny/heldout,
2 math-tiny/heldout, 3 math-tiny/train, 4 sft-tiny/train), then each later split skips every question
already taken, so the four arithmetic sets share no question text (whitespace-normalised).
"""
    path = out_dir / "PROVENANCE.md"
    path.write_text(text + other_sections(path), encoding="utf-8")


def other_sections(path: Path) -> str:
    """The sections other build scripts wrote into PROVENANCE.md (between their marker lines), kept as they are."""
    if not path.exists():
        return ""
    marked = re.finditer(r"<!-- ([\w-]+): written by .*?<!-- end \1 -->\n", path.read_text(encoding="utf-8"), re.S)
    return "".join("\n" + m.group(0) for m in marked)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    difficulty = Difficulty(args.max_digits, args.max_terms, args.max_animal_count)
    chat_rows = chatterbot_conversations()
    split_sizes = {"sft-tiny/heldout.jsonl": args.sft_heldout_rows,
                   "math-tiny/heldout.jsonl": args.math_heldout_rows,
                   "math-tiny/train.jsonl": args.math_train_rows,
                   "sft-tiny/train.jsonl": args.sft_train_rows - len(chat_rows)}
    taken: set[str] = set()
    problems = {name: draw_problems(args.datasets, difficulty, args.seed + (k + 1) * SEED_STRIDE, size, taken)
                for k, (name, size) in enumerate(split_sizes.items())}
    files = {name: [prompt_row(p) for p in split] for name, split in problems.items()}
    sft_train = [sft_row(p) for p in problems["sft-tiny/train.jsonl"]] + chat_rows
    rng = random.Random(args.seed)
    rng.shuffle(sft_train)
    add_system_prompts(sft_train, args.system_fraction, rng)
    files["sft-tiny/train.jsonl"] = sft_train
    for name, rows in files.items():
        write_jsonl(args.out_dir / name, rows)
        print(f"{name}: {len(rows)} rows, {(args.out_dir / name).stat().st_size} bytes")
    write_provenance(args.out_dir, args, files)


if __name__ == "__main__":
    main(sys.argv[1:])
