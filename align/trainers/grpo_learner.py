"""One GRPO learner: the policy in a DeepSpeed engine, a frozen reference beside it, and the policy update.

A plain Python object; the GRPO driver runs N of them as a Ray actor group. Each receives its shard of
the rollout batch as tensors and takes `updates_per_batch` optimizer steps on it (gradients averaged
across learners by DeepSpeed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from align import checkpoint
from align.config.grpo_schema import GRPORecipe
from align.models.export import full_state_dict, gathered, save_hf_checkpoint
from align.models.loading import build_model, load_tokenizer
from align.rl.losses import policy_loss, truncated_is_weights
from align.trainers import engine as ds_setup


@dataclass
class RolloutShard:
    """A learner's part of one rollout batch. Rows hold prompt + completion, right-padded."""

    input_ids: torch.Tensor  # [rows, width]
    completion_mask: torch.Tensor  # [rows, width] float, 1 on completion tokens that count in the loss
    rollout_logp: torch.Tensor  # [rows, width], the engine's log-probs on completion tokens, 0 elsewhere
    advantages: torch.Tensor  # [rows]
    global_tokens: int  # completion tokens in the whole batch, all learners (token-mean normaliser)
    global_rows: int  # rows that count in the whole batch, all learners


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi_T(x_t | x_<t) = log softmax(logits / T) at x_t, aligned with `input_ids` (position 0 gets 0):
    logits [B, L, V] -> [B, L]. T is the sampling temperature, so these are the probabilities the rollout
    engine sampled from (and reported), and ratios against its log-probs compare like with like."""
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    scaled = logits[:, :-1].float() / temperature
    logp[:, 1:] = F.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp


class GRPOLearner:
    def __init__(self, recipe: GRPORecipe, rank: int, world_size: int, master_addr: str, master_port: int):
        torch.set_num_threads(recipe.cluster.threads_per_worker)
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.backend = ds_setup.init_process_group(rank, world_size, master_addr, master_port,
                                                   recipe.cluster.backend)
        ds_setup.seed_everything(recipe.train.seed + rank)
        self.tokenizer = tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        self.engine, self.moe_classes = ds_setup.build_policy_engine(
            recipe.model, recipe.lora, recipe.deepspeed, recipe.train, world_size, recipe.algorithm.steps, tokenizer)
        self.model_config = self.engine.module.config
        self.device = self.engine.device
        self.temperature = recipe.rollout.temperature if recipe.rollout.temperature > 0 else 1.0
        # The reference is a frozen copy of the starting policy, outside DeepSpeed (beta 0: none at all),
        # taken from the engine's weights so that every rank holds the same one even for a preset's random init.
        self.reference = None
        if recipe.algorithm.kl_coef > 0:
            self.reference = build_model(recipe.model, tokenizer).eval().requires_grad_(False).to(self.device)
            self.reset_reference()

    def policy_state(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """Collective: the full policy weights (LoRA merged), on rank 0 only unless `all_ranks`."""
        with gathered(self.engine.module, self.recipe.deepspeed.zero_stage):
            return full_state_dict(self.engine.module) if all_ranks or self.rank == 0 else None

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Collective under ZeRO-3: the learner's own greedy completions (to check weight sync against)."""
        from rollout.torch_engine import SamplingConfig, TorchEngine

        engine = TorchEngine(self.engine.module, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        completions = engine.generate(prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0))
        self.engine.module.train()
        return [c.token_ids for c in completions]

    def logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Collective under ZeRO-3: per-token log-probs at the sampling temperature of each row (position 0: 0)."""
        return [self._logprobs(self.engine, torch.tensor([row], device=self.device))[0].cpu() for row in rows]

    def export_hf(self, directory: str) -> None:
        """Collective: rank 0 writes a transformers checkpoint of the policy."""
        save_hf_checkpoint(self.engine.module, self.recipe.deepspeed.zero_stage, self.rank, self.tokenizer, directory)

    def reset_reference(self) -> None:
        """Iterative RL (and at the start): the reference becomes the current policy."""
        state = self.policy_state(all_ranks=True)
        if self.reference is not None:
            self.reference.load_state_dict(state)

    def save_state(self, directory: str) -> None:
        """Collective: DeepSpeed engine state (weights, optimizer, lr schedule), this rank's random generators,
        and the reference when the run resets it (otherwise it is rebuilt from the starting policy)."""
        self.engine.save_checkpoint(directory, tag="engine")
        checkpoint.save_rng(directory, self.rank)
        if self.reference is not None and self.recipe.algorithm.reference_reset_every and self.rank == 0:
            save_file({k: v.contiguous() for k, v in self.reference.state_dict().items()},
                      str(Path(directory) / "reference.safetensors"))

    def load_state(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag="engine")
        checkpoint.load_rng(directory, self.rank)
        saved = Path(directory) / "reference.safetensors"
        if self.reference is not None and saved.exists():  # else it is still the starting policy built above
            self.reference.load_state_dict(load_file(str(saved), device=str(self.device)))

    @torch.no_grad()
    def _logprobs(self, model: Any, input_ids: torch.Tensor) -> torch.Tensor:
        return token_logprobs(model(input_ids=input_ids, use_cache=False).logits, input_ids, self.temperature)

    def update(self, shard: RolloutShard) -> dict[str, float]:
        """`updates_per_batch` optimizer steps on this shard; returns loss, KL, clip and timing metrics."""
        started, skipped = time.perf_counter(), self.engine.skipped_steps
        algo, micro = self.recipe.algorithm, self.recipe.train.micro_batch_size
        rows = shard.input_ids.shape[0]
        slices = [slice(i, i + micro) for i in range(0, rows, micro)]
        to = lambda t: t.to(self.device)  # noqa: E731
        ref_logp = [self._logprobs(self.reference, to(shard.input_ids[s])) for s in slices] \
            if self.reference is not None else [None] * len(slices)
        # pi_old: the policy that sampled. With one update and no TIS its log-probs equal the learner's own
        # at the first pass, so they are taken from that pass (detached) instead of an extra forward.
        need_old = algo.updates_per_batch > 1 or algo.tis_cap is not None
        if algo.overlap_rollout:  # the batch was sampled one update ago: pi_old is the engine's policy
            old_logp = [to(shard.rollout_logp[s]) for s in slices]
        elif need_old:
            old_logp = [self._logprobs(self.engine, to(shard.input_ids[s])) for s in slices]
        else:
            old_logp = None
        sums: dict[str, float] = {}
        for _ in range(algo.updates_per_batch):
            for index, s in enumerate(slices):
                input_ids, mask = to(shard.input_ids[s]), to(shard.completion_mask[s])
                outputs = self.engine(input_ids=input_ids, use_cache=False, output_router_logits=bool(self.moe_classes))
                logp = token_logprobs(outputs.logits, input_ids, self.temperature)
                old = old_logp[index] if old_logp is not None else logp.detach()
                is_weights = None
                if algo.tis_cap is not None:
                    is_weights = truncated_is_weights(old, to(shard.rollout_logp[s]), algo.tis_cap)
                loss, metrics = policy_loss(
                    logp, old, to(shard.advantages[s]), mask, eps_low=algo.clip_eps, eps_high=algo.clip_eps_high,
                    beta=algo.kl_coef, ref_logp=ref_logp[index], aggregation=algo.aggregation,
                    ratio_level=algo.ratio_level, max_completion_length=self.recipe.rollout.max_new_tokens,
                    is_weights=is_weights)
                loss = loss * self._share(mask, shard, len(slices))
                metrics["policy_loss"] = loss.item()
                if self.moe_classes:
                    balance = sum(self._balance(ds_setup.router_logits(outputs), mask).values())
                    metrics["balance_loss"] = balance.item()
                    loss = loss + balance
                self.engine.backward(loss)
                self.engine.step()
                for key, value in {"loss": loss.item(), **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value
        passes = algo.updates_per_batch * len(slices)
        result = {key: value / passes for key, value in sums.items()}
        result.update(**ds_setup.optimizer_metrics(self.engine, skipped), update_s=time.perf_counter() - started)
        return result

    def _share(self, mask: torch.Tensor, shard: RolloutShard, micro_batches: int) -> float:
        """Scale a micro-batch loss so that DeepSpeed's averaging (over micro-batches and learners) yields
        the batch-wide aggregate: count_here * micro_batches * learners / count_in_batch, where count is
        completion tokens for the token mean and counted rows otherwise."""
        if self.recipe.algorithm.aggregation == "token_mean":
            here, total = float(mask.sum()), shard.global_tokens
        else:
            here, total = float((mask.sum(-1) > 0).sum()), shard.global_rows
        return here * micro_batches * self.world_size / max(total, 1)

    def _balance(self, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Balance losses over each completion's tokens (one segment per row)."""
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
        segments = torch.where(mask > 0, rows, torch.full_like(rows, -1)).flatten()
        return ds_setup.balance_losses_for(router_logits, segments, self.model_config, self.recipe.moe)
