"""Full-weight state dicts for `save_pretrained`, from plain, LoRA and ZeRO-3-partitioned models."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def gathered(model: nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Context in which every parameter holds its full value (ZeRO-3 partitions are gathered)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights under the base model's own names, LoRA deltas merged in.

    Call inside `gathered(...)`. A peft model's `layer.base_layer.weight` becomes `layer.weight` plus
    the adapter's delta (B @ A * scale), and adapter tensors are dropped, so transformers and vLLM
    load the result as an ordinary checkpoint.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but a plain model needs none of this
        PeftModel = LoraLayer = ()  # noqa: N806
    if not isinstance(model, PeftModel):
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).detach()
                deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    state = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        value = tensor.detach().to("cpu", copy=True)
        if name in deltas:
            value += deltas[name].to(value.dtype).cpu()
        state[name] = value
    return state


def save_hf_checkpoint(model: nn.Module, zero_stage: int, rank: int, tokenizer: object, directory: str) -> None:
    """Collective: rank 0 writes a transformers checkpoint (safetensors, config, tokenizer, chat template).
    LoRA is merged into the weights; the adapter itself goes to `directory/adapter`."""
    from pathlib import Path

    with gathered(model, zero_stage):
        state = full_state_dict(model) if rank == 0 else None
    if rank == 0:
        is_peft = hasattr(model, "get_base_model")
        base = model.get_base_model() if is_peft else model
        base.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
        if is_peft:
            model.save_pretrained(str(Path(directory) / "adapter"))
    torch.distributed.barrier()
