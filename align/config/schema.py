"""The typed recipe schemas. Every field has its default and a one-line description (read this file to
learn the options). Sections shared by SFT and GRPO are defined once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.config.loader import option


@dataclass
class ModelConfig:
    preset: str | None = option(None, "build a fresh model from a named preset (align/models/presets.py)")
    path: str | None = option(None, "load a pretrained causal LM from this local HF checkpoint directory")
    tokenizer: str | None = option(None, "tokenizer directory; default: the model path")
    dtype: Literal["float32", "bfloat16"] = option("float32", "parameter and compute dtype")
    attn_implementation: str = option("sdpa", "transformers attention backend (sdpa, eager, flash_attention_2)")
    experts_implementation: str | None = option(None, "MoE expert kernel (grouped_mm default, eager)")
    preset_overrides: dict = option({}, "config fields to change on top of the preset, e.g. num_hidden_layers")
    seed: int = option(0, "seed for fresh (preset) model initialisation")

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of model.preset and model.path")


@dataclass
class MoEBalanceConfig:
    """DeepSeekMoE auxiliary balance losses (DeepSeek-V2 paper, section 2.2.3)."""

    alpha_expert: float = option(0.003, "expert-level balance coefficient a1 (0.003 in V2, 0.001 in V2-Lite)")
    alpha_device: float = option(0.05, "device-level balance coefficient a2 (0.05 in V2)")
    alpha_comm: float = option(0.02, "communication balance coefficient a3 (0.02 in V2)")
    n_devices: int | None = option(None, "device groups D the routed experts are split into; default n_group")
    max_devices: int | None = option(None, "devices M a token may send to; default topk_group")


@dataclass
class LoRAConfig:
    enabled: bool = option(False, "train LoRA adapters (peft) instead of all weights")
    r: int = option(16, "adapter rank")
    alpha: int = option(32, "adapter scaling numerator (lora_alpha)")
    dropout: float = option(0.0, "dropout on the adapter input")
    target_modules: list[str] = option(["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
                                       "module names that get adapters")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = option(2, "ZeRO stage 0-3")
    offload_optimizer: bool = option(False, "keep optimizer states on CPU (DeepSpeedCPUAdam)")
    precision: Literal["fp32", "bf16"] = option("fp32", "training precision; bf16 keeps fp32 master weights")
    extra: dict = option({}, "raw DeepSpeed config entries merged last (expert use)")

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
        if self.zero_stage == 0 and self.precision == "fp32":
            # DeepSpeed skips a step whose gradient norm is NaN/inf under ZeRO 1-3 and bf16, not in plain fp32.
            raise ValueError("deepspeed.zero_stage 0 in fp32 has no non-finite gradient check, so a NaN would reach "
                             "the weights; use zero_stage 1 (no extra cost on one learner) or precision bf16")


@dataclass
class ClusterConfig:
    num_workers: int = option(2, "data-parallel learner processes (Ray actors)")
    cpus_per_worker: float = option(1, "Ray CPUs reserved per learner")
    gpus_per_worker: float = option(0, "Ray GPUs per learner (0 on CPU machines)")
    backend: Literal["auto", "gloo", "nccl"] = option("auto", "torch.distributed backend; auto: nccl on GPU")
    ray_address: str | None = option(None, "existing Ray cluster address; None joins $RAY_ADDRESS if set, "
                                                "else starts Ray locally")
    threads_per_worker: int = option(1, "torch threads per learner process")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", "Ray placement-group strategy for the learners")
    call_timeout_s: float = option(1800, "seconds before a remote call to a worker is declared hung")

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"cluster.num_workers must be >= 1, got {self.num_workers}")


@dataclass
class OutputConfig:
    dir: str = option("runs/sft", "run directory: checkpoints, metrics.jsonl, tensorboard, plots")
    save_every: int = option(0, "steps between checkpoints (0: only at the end)")
    keep_last: int = option(2, "training checkpoints to keep")
    log_every: int = option(1, "steps between metric records")
    overwrite: bool = option(False, "allow a new run in a directory that already holds one")


@dataclass
class SFTDataConfig:
    train: list[str] = option([], "chat data: .jsonl, .parquet files or HF dataset directories")
    messages_key: str = option("messages", "column holding the list of {role, content} messages")
    max_length: int = option(512, "tokens per packed row (longer samples are truncated)")
    packing: bool = option(True, "pack several samples per row; attention never crosses samples")
    shuffle_buffer: int = option(10000, "rows held for streaming shuffle (constant memory)")
    skip_bad_rows: bool = option(False, "skip malformed rows (counted) instead of stopping")
    seed: int = option(0, "data order seed")


@dataclass
class OptimConfig:
    """The optimizer, schedule and batch split every learner shares (SFT, GRPO)."""

    micro_batch_size: int = option(8, "rows per forward/backward on each worker")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(2e-5, "peak learning rate (DeepSeek-V2 SFT: 5e-6; DeepSeekMath GRPO: 1e-6)")
    min_lr_ratio: float = option(0.1, "final lr as a fraction of peak")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "decay after warm-up")
    warmup_steps: int = option(0, "linear warm-up, in optimizer steps (GRPO: steps x updates_per_batch of them in all)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: list[float] = option([0.9, 0.95], "AdamW betas")
    max_grad_norm: float = option(1.0, "gradient clipping (0 disables)")
    seed: int = option(0, "seed for dropout and other training randomness")
    max_nonfinite_in_row: int = option(3, "stop the run after this many optimizer steps in a row were skipped "
                                       "for a NaN/inf loss or gradient")


@dataclass
class SFTTrainConfig(OptimConfig):
    epochs: float = option(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0: derived from epochs")
    global_batch_size: int | None = option(None, "rows per optimizer step; must equal micro x accum x workers")


@dataclass
class SFTRecipe:
    model: ModelConfig = option(help="policy model and tokenizer")
    data: SFTDataConfig = option(SFTDataConfig(), "chat data")
    train: SFTTrainConfig = option(SFTTrainConfig(), "optimisation")
    moe: MoEBalanceConfig = option(MoEBalanceConfig(), "MoE balance losses (ignored for dense models)")
    lora: LoRAConfig = option(LoRAConfig(), "LoRA adapters")
    deepspeed: DeepSpeedConfig = option(DeepSpeedConfig(), "DeepSpeed engine")
    cluster: ClusterConfig = option(ClusterConfig(), "Ray workers")
    output: OutputConfig = option(OutputConfig(), "run directory and logging")

    def __post_init__(self) -> None:
        self.train.global_batch_size = check_batch(self.train, self.cluster.num_workers)
        if not self.data.train:
            raise ValueError("data.train lists no files")


def check_batch(train: SFTTrainConfig, num_workers: int) -> int:
    """global = micro_batch_size x grad_accum x num_workers; a given global batch must match exactly."""
    for key, value in (("micro_batch_size", train.micro_batch_size), ("grad_accum", train.grad_accum)):
        if value < 1:
            raise ValueError(f"train.{key} must be >= 1, got {value}")
    product = train.micro_batch_size * train.grad_accum * num_workers
    if train.global_batch_size is not None and train.global_batch_size != product:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} != micro_batch_size {train.micro_batch_size}"
            f" x grad_accum {train.grad_accum} x cluster.num_workers {num_workers} = {product}")
    return product
