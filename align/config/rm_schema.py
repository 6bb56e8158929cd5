"""The reward-model recipe schema (`align rm`). DeepSeek-V2 (section 3.2) initialises reward models from the
SFT model and trains them point-wise or pair-wise; DeepSeekMath trains its reward model at lr 2e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.config.loader import option
from align.config.schema import (
    ClusterConfig,
    DeepSpeedConfig,
    ModelConfig,
    MoEBalanceConfig,
    OptimConfig,
    OutputConfig,
    check_batch,
)


@dataclass
class RMDataConfig:
    train: list[str] = option([], "rows: .jsonl/.parquet/HF dataset dirs (pairwise: prompt, chosen, rejected; "
                                  "point-wise: prompt, completion, label)")
    heldout: str | None = option(None, "held-out rows of the same shape, scored before and after training")
    heldout_limit: int = option(1000, "held-out rows to score")
    prompt_key: str = option("prompt", "column holding the prompt messages [{role, content}]")
    chosen_key: str = option("chosen", "pairwise: column holding the preferred response text")
    rejected_key: str = option("rejected", "pairwise: column holding the other response text")
    margin_key: str = option("margin", "pairwise: optional column with a margin m (loss -log sigmoid(r_c-r_r-m))")
    completion_key: str = option("completion", "point-wise: column holding the response text")
    label_key: str = option("label", "point-wise: column holding the target score (0/1 for bce)")
    category_key: str = option("category", "optional column; held-out accuracy is also reported per category")
    max_length: int = option(512, "tokens per scored prompt + response; longer ones keep their last tokens")
    shuffle_buffer: int = option(10000, "rows held for streaming shuffle (constant memory)")
    seed: int = option(0, "data order seed")


@dataclass
class RMTrainConfig(OptimConfig):
    loss: Literal["pairwise", "mse", "bce"] = option(
        "pairwise", "pairwise: Bradley-Terry on chosen/rejected; mse or bce: point-wise on completion/label")
    epochs: float = option(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0: derived from epochs")
    global_batch_size: int | None = option(None, "pairs (or point-wise rows) per optimizer step; must equal "
                                           "micro_batch_size x grad_accum x workers")
    eval_every: int = option(0, "steps between held-out evaluations (0: only before and after training)")


@dataclass
class RMRecipe:
    model: ModelConfig = option(help="starting point: a causal LM (an align sft checkpoint or a preset) gets a new "
                                     "scalar score head; a reward-model checkpoint continues training")
    data: RMDataConfig = option(RMDataConfig(), "preference or point-wise data")
    train: RMTrainConfig = option(RMTrainConfig(), "optimisation (micro_batch_size counts pairs for pairwise)")
    moe: MoEBalanceConfig = option(MoEBalanceConfig(), "MoE balance losses (ignored for dense models)")
    deepspeed: DeepSpeedConfig = option(DeepSpeedConfig(), "DeepSpeed engine")
    cluster: ClusterConfig = option(ClusterConfig(), "Ray workers")
    output: OutputConfig = option(OutputConfig(dir="runs/rm"), "run directory and logging")

    def __post_init__(self) -> None:
        self.train.global_batch_size = check_batch(self.train, self.cluster.num_workers)
        if not self.data.train:
            raise ValueError("data.train lists no files")
        if self.data.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.data.max_length}")
