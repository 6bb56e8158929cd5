"""DeepSpeed set-up shared by every learner: process group, engine config, optimizer, lr schedule.

On a CPU machine DeepSpeed runs its CPU accelerator over gloo; on GPUs the same code takes NCCL.
Only the recipe changes (cluster.backend, deepspeed.*), never this code.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from align.config.schema import DeepSpeedConfig, SFTTrainConfig
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


def deepspeed_config(ds: DeepSpeedConfig, train: SFTTrainConfig, world_size: int) -> dict[str, Any]:
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


def make_optimizer(model: nn.Module, train: SFTTrainConfig, offload: bool) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; DeepSpeed's CPU Adam when optimizer states live on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": train.lr, "betas": tuple(train.betas), "weight_decay": train.weight_decay}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, train: SFTTrainConfig, total_steps: int) -> Any:
    def factor(step: int) -> float:
        return lr_factor(step, train.warmup_steps, total_steps, train.schedule, train.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
