"""`align sft` end to end: real Ray, real DeepSpeed (gloo), two learners, the shipped tiny recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_RECIPE

pytestmark = pytest.mark.slow


def run_align(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_learners_train_and_export_a_loadable_model(tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    result = run_align("sft", str(TINY_RECIPE), "train.max_steps=24", "train.warmup_steps=4",
                       f"deepspeed.zero_stage={zero_stage}", f"output.dir={run_dir}", "output.save_every=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 x DeepSpeed ZeRO-{zero_stage} on gloo" in result.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    first, last = records[0]["lm_loss"], sum(r["lm_loss"] for r in records[-4:]) / 4
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(r["balance_loss"] > 0 and r["tokens"] > 0 for r in records)

    # keep_last=2 of the saves at 10, 20 and the final one at 24
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000020", "step-00000024"]
    final = run_dir / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert any((run_dir / "tensorboard").iterdir())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "deepseek_v2" and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert torch.isfinite(loss)
