"""`align sft` end to end: real Ray, real DeepSpeed (gloo), two learners, the shipped tiny recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RECIPE
from tests.helpers.processes import assert_same_run, finish, launch, logged_steps, run, wait_until

pytestmark = pytest.mark.slow


def sft_args(zero_stage: int) -> list[str]:
    return [str(TINY_RECIPE), "train.max_steps=24", "train.warmup_steps=4", f"deepspeed.zero_stage={zero_stage}",
            "output.save_every=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`align sft` runs of the tiny recipe by ZeRO stage, each made once: (run directory, output)."""
    runs: dict[int, tuple[Path, str]] = {}

    def get(zero_stage: int) -> tuple[Path, str]:
        if zero_stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero{zero_stage}") / "run"
            runs[zero_stage] = run_dir, run("sft", sft_args(zero_stage), run_dir)
        return runs[zero_stage]

    return get


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_learners_train_and_export_a_loadable_model(trained, zero_stage):
    run_dir, output = trained(zero_stage)
    assert f"2 x DeepSpeed ZeRO-{zero_stage} on gloo" in output

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


def test_killed_at_any_step_resumes_exactly(trained, tmp_path):
    """kill -9 between the checkpoints at 10 and 20 (two learners, ZeRO-2); the resumed run replays the data
    stream and generators from step 10 and logs what the uninterrupted run logged."""
    reference, _ = trained(2)
    run_dir = tmp_path / "run"
    process = launch("sft", sft_args(2), run_dir)
    wait_until(lambda: logged_steps(run_dir) >= 13, process)
    process.kill()
    process.wait()
    output = run("sft", [*sft_args(2), "--resume"], run_dir)
    assert "resumed at step 10" in output
    assert_same_run(run_dir, reference, ("loss", "lm_loss", "balance_loss", "grad_norm", "lr", "tokens", "samples"))
    code, output = finish(launch("sft", sft_args(2), run_dir), run_dir)
    assert code == 2 and "already holds a run" in output
