"""Models and tokenizers: any local transformers causal LM, or a fresh model from a DeepSeek-V2 preset.

The path branch is the code users run on real checkpoints (`from_pretrained` on a local directory,
never a hub download); the preset branch builds the same architecture from a config, for CPU tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from align.config.schema import ModelConfig
from align.models.tokenizers import load_tokenizer

__all__ = ["build_model", "is_moe", "load_tokenizer", "moe_block_classes"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(config: ModelConfig, tokenizer: Any, scalar_head: bool = False) -> nn.Module:
    """Load `config.path`, or build `config.preset` with weights drawn from `config.seed`.

    `scalar_head`: a reward model instead of a causal LM: the sequence-classification class of the same
    architecture with one output (`num_labels=1`). From a causal LM checkpoint its body is loaded and the
    score head is new; a reward-model checkpoint loads whole. The score is read at the last token that is
    not `pad_token_id`, so the config's pad id is set to the tokenizer's."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    head = {"num_labels": 1} if scalar_head else {}
    dtype = DTYPES[config.dtype]
    if config.path is not None:
        model = auto_class.from_pretrained(
            config.path, dtype=dtype, attn_implementation=config.attn_implementation, **head)
    else:
        from align.models.presets import build_config

        model_config = build_config(
            config.preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **head, **config.preset_overrides)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = auto_class.from_config(
                model_config, dtype=dtype, attn_implementation=config.attn_implementation)
    if scalar_head:
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.experts_implementation is not None:
        model.set_experts_implementation(config.experts_implementation)
    # Training never reuses a KV cache, and a cache object disables transformers' packed-sequence masks.
    model.config.use_cache = False
    return model


def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """Classes of sparse MoE blocks (a router `gate` beside an `experts` container). Under ZeRO-3 these
    must be leaf modules: ranks that route to different experts would otherwise wait on each other's
    parameter gathers forever."""
    classes: dict[str, type[nn.Module]] = {}
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "gate"):
            classes[type(module).__name__] = type(module)
    return list(classes.values())


def is_moe(model: nn.Module) -> bool:
    return bool(moe_block_classes(model))
