"""What the learners apply equals the math: the full gradient that real DeepSpeed learners (2 ranks over gloo,
4 GRPO / 3 SFT micro-batches each, ZeRO-2 and ZeRO-3, clipping off) hold at the accumulation boundary, before
the optimizer step, equals the gradient of one loss call over the whole batch in one process.

GRPO: every aggregation (DeepSeekMath, DAPO token mean, Dr. GRPO's fixed B x L_max, GSPO sequence ratios), on
policy, with TIS and off policy (clipping binds), over a batch with a masked row, a filler group, a truncated row
and one micro-batch with no row that counts; the MoE balance losses off (alpha 0), then on against their own
one-call mean; per-token (process) advantages; one learner with nothing that counts; the k3 KL to a reference
that differs from the policy, plain and ratio-weighted. SFT: packed rows of unequal target counts over
micro-batches and ranks, balance losses off and on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.models.loading import build_model, load_tokenizer
from align.trainers.grpo_learner import merge_learner_metrics
from tests.helpers import gradients

pytestmark = pytest.mark.slow

# fp32 throughout; the reference sums the same numbers in another order, so elements of a parameter's gradient
# far below its largest one may differ by rounding relative to that largest element
RTOL = 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_learners(mode: str, zero_stage: int, out: Path) -> None:
    """Both ranks of `tests/helpers/grad_worker.py`, to completion."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.helpers.grad_worker", mode, str(zero_stage), str(rank),
                               str(port), str(out)], cwd=gradients.ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(gradients.WORLD)]
    outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output[-4000:]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def learner_runs(request, tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp(f"grads-zero{request.param}")
    run_learners("grpo", request.param, out)
    run_learners("sft", request.param, out)
    return request.param, out


def test_a_bf16_policy_s_reference_is_bf16_so_the_first_kl_is_zero(tmp_path) -> None:
    """Under deepspeed.precision=bf16 the policy computes in bf16; the reference is built in the same dtype from
    the same weights, so the first update's KL is exactly 0. A float32 reference of the same weights would not
    be: the bf16 forward's rounding alone gives a KL above 0."""
    run_learners("bf16", 2, tmp_path)
    for rank in range(gradients.WORLD):
        saved = torch.load(tmp_path / f"bf16-rank{rank}.pt")
        assert saved["policy_dtype"] == saved["reference_dtype"] == "torch.bfloat16"
        assert saved["kl"] == 0.0
        assert saved["float32_reference_kl"] > 1e-6


def reference_model(recipe, weights: Path) -> torch.nn.Module:
    model = build_model(recipe.model, load_tokenizer(recipe.model.tokenizer or recipe.model.path))
    model.load_state_dict(torch.load(weights))
    return model.float().train()


def assert_same_gradients(applied: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert applied.keys() == reference.keys()
    nonzero = 0
    for name, expected in reference.items():
        got = applied[name].reshape(expected.shape)
        scale = float(expected.abs().max())
        nonzero += scale > 0
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert nonzero > len(reference) // 2, "most parameters should get a gradient"


@pytest.mark.parametrize("case", list(gradients.grpo_cases()))
def test_grpo_learners_apply_the_gradient_of_one_loss_over_the_batch(learner_runs, case: str) -> None:
    zero_stage, out = learner_runs
    recipe = gradients.with_algorithm(gradients.grpo_recipe(zero_stage, balance=case == "balance"),
                                      **gradients.grpo_cases()[case])
    model = reference_model(recipe, out / "weights-grpo.pt")
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    batch = gradients.case_batch(case, len(tokenizer), tokenizer.pad_token_id)
    kl_reference = reference_model(recipe, out / "weights-reference.pt") if recipe.algorithm.kl_coef else None
    reference, loss, mismatch = gradients.grpo_reference(model, recipe, batch, kl_reference)
    ranks = [torch.load(out / f"grpo-{case}-rank{rank}.pt") for rank in range(gradients.WORLD)]
    for saved in ranks:  # every rank holds (its view of) the same full gradient
        assert_same_gradients(saved["grads"], reference)
    # the loss the learners report (each its share x world, averaged over ranks by the driver) is the batch's
    assert sum(saved["metrics"]["loss"] for saved in ranks) / len(ranks) == pytest.approx(loss, rel=1e-5, abs=1e-7)
    # the engine-learner gap, merged over the learners, is the batch's
    merged = merge_learner_metrics([saved["metrics"] for saved in ranks])
    for key, value in mismatch.items():
        assert merged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert merged["mismatch/logp_abs_mean"] > 0.05
    if recipe.algorithm.behaviour_cap == 1.3:  # the engine's log-probs are the learner's +- 0.3: exp(0.3) > 1.3
        assert merged["is_truncated"] > 0
    assert (merged["mismatch/outside_nucleus"] > 0.5) == (case == "nucleus")
    assert merged["entropy"] > 0
    if case == "balance":
        assert ranks[0]["metrics"]["balance_loss"] > 0
    if case.startswith("kl"):
        assert ranks[0]["metrics"]["kl"] > 1e-3  # the reference differs from the policy
    if case == "rank1_masked":  # that learner still takes part: its zero gradient is summed with the other's
        assert gradients.shards(batch, "seq_mean_token_mean")[1].completion_mask.sum() == 0


def test_a_batch_in_which_nothing_counts_takes_no_optimizer_step(learner_runs):
    _, out = learner_runs
    cases = len(gradients.grpo_cases())
    for rank in range(gradients.WORLD):
        saved = torch.load(out / f"grpo-empty-rank{rank}.pt")
        assert saved["metrics"]["empty_updates"] == 1 and saved["metrics"]["loss"] == 0
        assert saved["steps"] == cases  # one optimizer step per case before it, none for it


def test_the_normaliser_each_learner_is_given_is_the_whole_batch_s():
    batch = gradients.rollout_batch(vocab=300, pad_id=0)
    counted_rows, counted_tokens = gradients.ROWS - len(gradients.MASKED_ROWS), int(batch["mask"].sum())
    for aggregation, expected in [("seq_mean_token_mean", counted_rows), ("token_mean", counted_tokens),
                                  ("seq_mean_token_sum_norm", gradients.ROWS * gradients.MAX_NEW)]:
        shards = gradients.shards(batch, aggregation)
        assert [s.loss_normaliser for s in shards] == [expected] * gradients.WORLD, aggregation
        assert [s.counted_rows for s in shards] == [counted_rows] * gradients.WORLD


@pytest.mark.parametrize("case", ["no_balance", "balance"])
def test_sft_learners_apply_the_gradient_of_the_step_token_mean(learner_runs, case: str) -> None:
    zero_stage, out = learner_runs
    recipe = gradients.sft_recipe(zero_stage, balance=case == "balance")
    ranks = [torch.load(out / f"sft-{case}-rank{rank}.pt") for rank in range(gradients.WORLD)]
    batches = [batch for saved in ranks for batch in saved["batches"]]
    targets = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(batches) == 6 and len(set(targets)) > 1, f"micro-batches should differ in target count: {targets}"
    reference, loss = gradients.sft_reference(reference_model(recipe, out / "weights-sft.pt"), recipe, batches)
    for saved in ranks:
        assert_same_gradients(saved["grads"], reference)
    assert sum(saved["metrics"]["loss"] for saved in ranks) / len(ranks) == pytest.approx(loss, rel=1e-5)
