"""Memory planning for a recipe, from the model built on the meta device (nothing is allocated).

This is how the `deepseek-v2` (236B) and `deepseek-v2-lite` presets are used on a machine that could
never hold them: `align sft RECIPE --plan` prints what each learner would need under the recipe's
ZeRO stage, before anyone books a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    parameters: int
    trainable: int
    weights_gib: float  # per learner, model weights as trained
    grads_gib: float  # per learner
    optimizer_gib: float  # per learner, on the device (0 when offloaded)
    offloaded_gib: float  # per learner, optimizer states in host memory

    @property
    def device_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib


def zero_memory(parameters: int, trainable: int, workers: int, zero_stage: int, precision: str,
                offload_optimizer: bool) -> MemoryPlan:
    """Model-state memory per learner under ZeRO (Rajbhandari et al. 2020, section 5), activations excluded.

    With w = bytes per weight, g = bytes per gradient (same precision), and Adam states
    o = 8 bytes per trainable parameter in fp32 (m, v), plus 4 for the fp32 master copy when training
    in bf16:   stage 0: P*w + T*(g + o)
               stage 1: P*w + T*g + T*o / N
               stage 2: P*w + T*(g + o) / N
               stage 3: (P*w + T*(g + o)) / N
    where P = parameters, T = trainable parameters, N = learners.
    """
    w = BYTES[precision]
    o = 8 + (4 if precision == "bf16" else 0)
    n = workers
    weights = parameters * w / (n if zero_stage == 3 else 1)
    grads = trainable * w / (n if zero_stage >= 2 else 1)
    optimizer = trainable * o / (n if zero_stage >= 1 else 1)
    gib = 1024**3
    return MemoryPlan(parameters, trainable, weights / gib, grads / gib,
                      0.0 if offload_optimizer else optimizer / gib, optimizer / gib if offload_optimizer else 0.0)


def plan_recipe(model_config: object, lora: object, ds: object, workers: int, vocab_size: int | None) -> dict:
    """Parameter counts (meta device) and the per-learner memory plan of a recipe's model section."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_config.preset is not None:
        from align.models.presets import build_config

        config = build_config(model_config.preset, **({"vocab_size": vocab_size} if vocab_size else {}),
                              **model_config.preset_overrides)
    else:
        config = AutoConfig.from_pretrained(model_config.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = {"total": sum(p.numel() for p in model.parameters())}
    if config.model_type == "deepseek_v2":
        from align.models.presets import count_parameters_meta

        counts = count_parameters_meta(config)
    trainable = counts["total"]
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        with torch.device("meta"):
            peft_model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                          target_modules=lora.target_modules))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    memory = zero_memory(counts["total"], trainable, workers, ds.zero_stage, ds.precision, ds.offload_optimizer)
    return {"counts": counts, "memory": memory, "model_type": config.model_type}
