"""Held-out accuracy on math problems: greedy answers from a model, checked against references.

Used to show what training changed (`align eval MODEL`): the same problems, the same decoding,
before and after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rewards.answers import answers_match, extract_final_answer


def load_problems(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int,
                   batch_size: int = 32) -> list[str]:
    """Greedy completions for chat prompts, batched with left padding."""
    tokenizer.padding_side = "left"
    completions: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="eval", unit="batch", leave=False):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start : start + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return completions


def math_accuracy(model: Any, tokenizer: Any, problems: list[dict], max_new_tokens: int = 128
                  ) -> tuple[float, list[dict]]:
    completions = greedy_answers(model.eval(), tokenizer, [p["prompt"] for p in problems], max_new_tokens)
    results = []
    for problem, completion in zip(problems, completions):
        predicted = extract_final_answer(completion)
        results.append({"answer": problem["answer"], "predicted": predicted, "completion": completion,
                        "correct": answers_match(predicted, str(problem["answer"]))})
    return sum(r["correct"] for r in results) / max(1, len(results)), results
