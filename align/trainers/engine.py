"""DeepSpeed set-up shared by every learner: process group, engine config, optimizer, lr schedule.

On a CPU machine DeepSpeed runs its CPU accelerator over gloo; on GPUs the same code takes NCCL.
Only the recipe changes (cluster.backend, deepspeed.*), never this code.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from align.config.schema import DeepSpeedConfig, LoRAConfig, ModelConfig, MoEBalanceConfig, OptimConfig
from align.models.loading import build_model, moe_block_classes
from align.trainers.schedule import lr_factor


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str) -> str:
    """Join the learners' torch.distributed group through DeepSpeed; returns the backend used."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Ray narrows CUDA_VISIBLE_DEVICES to the actor's own GPU, so its local index is always 0.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return backend


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_config(ds: DeepSpeedConfig, train: OptimConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config the recipe implies."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    config.update(ds.extra)
    return config


def make_optimizer(model: nn.Module, train: OptimConfig, offload: bool) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; DeepSpeed's CPU Adam when optimizer states live on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": train.lr, "betas": tuple(train.betas), "weight_decay": train.weight_decay}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, train: OptimConfig, total_steps: int) -> Any:
    def factor(step: int) -> float:
        return lr_factor(step, train.warmup_steps, total_steps, train.schedule, train.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_policy_engine(model_cfg: ModelConfig, lora: LoRAConfig, ds: DeepSpeedConfig, train: OptimConfig,
                        world_size: int, total_steps: int, tokenizer: Any) -> tuple[Any, list[type[nn.Module]]]:
    """The trainable policy in a DeepSpeed engine: model (+ LoRA), ZeRO-3 leaf MoE blocks, AdamW, lr schedule.
    Returns the engine and the model's MoE block classes (empty for dense models)."""
    model = build_model(model_cfg, tokenizer)
    moe_classes = moe_block_classes(model)
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return build_engine(model, moe_classes, ds, train, world_size, total_steps), moe_classes


def import_muon_uncompiled() -> None:
    """DeepSpeed's ZeRO optimizers import its Muon optimizer to recognise one, and that module wraps three kernels
    in torch.compile as it is imported, which loads inductor: about 4 CPU-seconds at every learner's start.
    align never builds Muon, so the module is imported once with DeepSpeed's compile decorator made the identity
    (its functions exist and run, eagerly); DeepSpeed's later imports of it find it loaded."""
    from deepspeed.runtime import compiler

    if "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules or not hasattr(compiler, "compile"):
        return
    compile_decorator = compiler.compile
    compiler.compile = lambda *args, **kwargs: (lambda function: function)
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except Exception:  # noqa: BLE001  a DeepSpeed without Muon, or one whose module this does not fit: import as is
        sys.modules.pop("deepspeed.runtime.zero.muon.muon_optimizer", None)
    finally:
        compiler.compile = compile_decorator


def build_engine(model: nn.Module, moe_classes: list[type[nn.Module]], ds: DeepSpeedConfig, train: OptimConfig,
                 world_size: int, total_steps: int) -> Any:
    """Any model (policy, reward model) in a DeepSpeed engine: ZeRO-3 leaf MoE blocks, AdamW, lr schedule."""
    import deepspeed

    import_muon_uncompiled()

    if moe_classes and ds.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, moe_classes)
    optimizer = make_optimizer(model, train, ds.offload_optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=make_scheduler(optimizer, train, total_steps),
                                           config=deepspeed_config(ds, train, world_size))
    check_mean_reduction(engine, world_size)
    return engine


def check_mean_reduction(engine: Any, world_size: int) -> None:
    """`backward_summed` undoes DeepSpeed's gradient mean over the learners; refuse any set-up where DeepSpeed
    reduces otherwise (deepspeed.extra with gradient_allreduce_op sum or a predivide factor, sequence
    parallelism, DeepSpeed-MoE expert groups), before a step is taken with a gradient of the wrong size."""
    problems = []
    if not engine.gradient_average:
        problems.append("gradients are summed, not averaged (gradient_allreduce_op)")
    if engine.gradient_predivide_factor() != 1.0:
        problems.append(f"gradient_predivide_factor {engine.gradient_predivide_factor()}")
    if engine.dp_world_size != world_size:
        problems.append(f"the data-parallel group has {engine.dp_world_size} ranks, not the {world_size} learners")
    if getattr(engine, "sequence_parallel_size", 1) != 1:
        problems.append(f"sequence_parallel_size {engine.sequence_parallel_size}")
    if engine.has_moe_layers:
        problems.append("DeepSpeed-MoE expert-parallel layers")
    if problems:
        raise ValueError("align's loss normalisation needs DeepSpeed to average gradients over the learners' "
                         f"data-parallel group; this configuration does not: {'; '.join(problems)} (deepspeed.extra)")


def backward_summed(engine: Any, loss: torch.Tensor) -> None:
    """Backward of one micro-batch's share of a batch-wide loss, so that the gradient DeepSpeed applies at the
    accumulation boundary is the SUM of every micro-batch's and every learner's gradient.

    The one place where DeepSpeed's own averaging is undone. DeepSpeed would divide each micro-batch loss by
    gradient_accumulation_steps (turned off: `scale_wrt_gas=False`) and averages the gradients over the W
    data-parallel ranks in its reduce (undone here: x W). With each share = (its rows' sum) / (the batch's
    normaliser), the applied gradient is then d/dtheta of one loss over the whole batch:

        g = sum_ranks sum_micro d(share)/dtheta = d/dtheta (sum_rows l / N)
    """
    engine.backward(loss * engine.dp_world_size, scale_wrt_gas=False)


def full_gradients(engine: Any) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full, reduced gradient (fp32, on the CPU) after the last backward of an
    accumulation and before the step: what the optimizer is about to apply, before clipping. A collective
    under ZeRO-3 (every rank must call it). Every rank ends up with the whole model's gradient in host memory
    (DeepSeek-V2-Lite, 15.7B parameters: 63 GB of fp32 per rank), so it is for tests and debugging of small
    models; no training path calls it."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)
            grads[name] = grad.detach().float().cpu().clone() if grad is not None else torch.zeros(())
    return grads


def all_ranks_sum(values: list[float], device: Any) -> list[float]:
    """Each of `values` summed over the learners' process group, in one all-reduce (the values themselves
    outside one)."""
    if not torch.distributed.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def optimizer_metrics(engine: Any, skipped_before: int) -> dict[str, float]:
    """lr, global grad norm and `skipped_updates`: optimizer steps since `skipped_before` (the engine's
    `skipped_steps` then) that DeepSpeed skipped because the gradient norm was NaN/inf (weights, optimizer
    and lr schedule unchanged; reported grad norm inf)."""
    grad_norm = engine.get_global_grad_norm()
    return {"lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped_updates": engine.skipped_steps - skipped_before}


def router_logits(outputs: Any) -> tuple[torch.Tensor, ...]:
    """The per-layer router logits of a forward pass run with `output_router_logits=True`."""
    logits = getattr(outputs, "router_logits", None)
    if not logits:
        import transformers

        raise RuntimeError(f"the model returned no router_logits (transformers {transformers.__version__}); "
                           "the MoE balance loss needs them: install the pinned transformers (pyproject.toml)")
    return logits


def balance_losses_for(router_logits: tuple[torch.Tensor, ...], segment_ids: torch.Tensor, model_config: Any,
                       moe: MoEBalanceConfig) -> dict[str, torch.Tensor]:
    """DeepSeekMoE balance losses with the routing and device grouping of `model_config` (overridable in
    the recipe's `moe` section). segment_ids: [tokens], sequence index per token, -1 where ignored."""
    from align.models.balance import moe_balance_loss

    return moe_balance_loss(
        router_logits, segment_ids, top_k=model_config.num_experts_per_tok,
        n_devices=moe.n_devices or model_config.n_group, max_devices=moe.max_devices or model_config.topk_group,
        alpha_expert=moe.alpha_expert, alpha_device=moe.alpha_device, alpha_comm=moe.alpha_comm,
        method=model_config.topk_method, n_groups=model_config.n_group, topk_groups=model_config.topk_group)
