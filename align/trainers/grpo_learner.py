"""One GRPO learner: the policy in a DeepSpeed engine, a frozen reference beside it, and the policy update.

A plain Python object; the GRPO driver runs N of them as a Ray actor group. Each receives its shard of
the rollout batch as tensors and takes `updates_per_batch` optimizer steps on it. Every micro-batch's loss
is the sum over its rows divided by the normaliser of the whole batch, and DeepSpeed sums (not averages)
the micro-batches' and learners' gradients (`engine.backward_summed`), so each step applies the gradient
of one loss over the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from align import checkpoint
from align.config.grpo_schema import GRPORecipe
from align.models.export import full_state_dict, gathered, save_hf_checkpoint
from align.models.loading import build_model, load_tokenizer
from align.rl import losses
from align.rl.losses import mismatch_metrics, policy_loss, truncated_is_weights
from align.trainers import engine as ds_setup
from rollout.sampling import SampledLogprobs, sampled_logprobs


@dataclass
class RolloutShard:
    """A learner's part of one rollout batch. Rows hold prompt + completion, right-padded."""

    input_ids: torch.Tensor  # [rows, width]
    completion_mask: torch.Tensor  # [rows, width] float, 1 on completion tokens that count in the loss
    rollout_logp: torch.Tensor  # [rows, width], the engine's log-probs on completion tokens, 0 elsewhere
    advantages: torch.Tensor  # [rows] (outcome supervision) or [rows, width] (process supervision)
    loss_normaliser: float  # N of the aggregation over the whole batch, all learners (`loss_normaliser`)
    counted_rows: int  # rows with a token that counts in the whole batch, all learners (balance-loss mean)


# SHARES: this learner's share of a batch-wide loss (x world size); TOKEN_MEANS: means over this learner's
# counted tokens (`counted_tokens`); MAXES: maxima; the other metrics are plain per-learner values
SHARES = ("loss", "policy_loss", "balance_loss")
TOKEN_MEANS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio_mean",
               "entropy", "mismatch/logp_abs_mean", "mismatch/kl_k3", "mismatch/outside_nucleus", "is_truncated")
MAXES = ("mismatch/logp_abs_max",)


def merge_learner_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The batch's metrics from every learner's: token means weighted by each learner's counted tokens (a
    learner with none counts for nothing), maxima the maximum, everything else (loss shares x world, lr, grad
    norm, times) the mean over learners. A metric some learners lack (an empty shard) is merged over the others."""
    keys = list(dict.fromkeys(key for rank in per_rank for key in rank))
    merged = {}
    for key in keys:
        present = [rank for rank in per_rank if key in rank]
        values = [rank[key] for rank in present]
        if key in TOKEN_MEANS:
            tokens = [rank.get("counted_tokens", 0.0) for rank in present]
            merged[key] = sum(v * t for v, t in zip(values, tokens)) / max(sum(tokens), 1.0)
        elif key in MAXES:
            merged[key] = max(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


def optimizer_steps(recipe: GRPORecipe) -> int:
    """Optimizer steps in the run, the length of the lr schedule: steps x updates_per_batch."""
    return recipe.algorithm.steps * recipe.algorithm.updates_per_batch


class GRPOLearner:
    def __init__(self, recipe: GRPORecipe, rank: int, world_size: int, master_addr: str, master_port: int):
        torch.set_num_threads(recipe.cluster.threads_per_worker)
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.backend = ds_setup.init_process_group(rank, world_size, master_addr, master_port,
                                                   recipe.cluster.backend)
        ds_setup.seed_everything(recipe.train.seed + rank)
        self.tokenizer = tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        self.engine, self.moe_classes = ds_setup.build_policy_engine(
            recipe.model, recipe.lora, recipe.deepspeed, recipe.train, world_size, optimizer_steps(recipe), tokenizer)
        self.model_config = self.engine.module.config
        self.device = self.engine.device
        # The reference is a frozen copy of the starting policy, outside DeepSpeed (beta 0: none at all), in the
        # dtype the policy computes in, taken from the engine's weights so that every rank holds the same one
        # even for a preset's random init: at step 0 its log-probs are the policy's and the KL is 0.
        self.reference = None
        if recipe.algorithm.kl_coef > 0:
            self.reference = build_model(recipe.policy_model, tokenizer).eval().requires_grad_(False).to(self.device)
            self.reset_reference()

    @property
    def sampling(self) -> dict[str, Any]:
        """The distribution the engines sample from (rollout/sampling.py; greedy: the plain softmax)."""
        rollout = self.recipe.rollout
        return {"temperature": rollout.temperature, "top_k": rollout.top_k, "top_p": rollout.top_p} \
            if rollout.temperature > 0 else {}

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
        """Collective under ZeRO-3: per-token log-probs of each row under the sampling distribution (temperature,
        top-k, top-p; rollout/sampling.py), position 0: 0."""
        return [self._logprobs(self.engine, torch.tensor([row], device=self.device)).logp[0].cpu() for row in rows]

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
    def _logprobs(self, model: Any, input_ids: torch.Tensor) -> SampledLogprobs:
        return sampled_logprobs(model(input_ids=input_ids, use_cache=False).logits, input_ids, **self.sampling)

    def update(self, shard: RolloutShard) -> dict[str, float]:
        """`updates_per_batch` optimizer steps on this shard; returns loss, KL, clip and timing metrics."""
        return self._update(shard, capture=False)[0]

    def update_gradients(self, shard: RolloutShard) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """`update`, also returning the full gradient of every trainable parameter at the first accumulation
        boundary, before clipping and the optimizer step (`deepspeed.utils.safe_get_full_grad`, a collective
        under ZeRO-3): the gradient the learners apply, for tests and debugging."""
        return self._update(shard, capture=True)

    def _update(self, shard: RolloutShard, capture: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        started, skipped = time.perf_counter(), self.engine.skipped_steps
        if shard.counted_rows == 0:  # nothing in the batch counts (all fillers): no step, which would still move
            # the weights through Adam's momentum and weight decay and advance the lr schedule
            return {"loss": 0.0, "policy_loss": 0.0, "empty_updates": self.recipe.algorithm.updates_per_batch,
                    "counted_tokens": 0.0, **ds_setup.optimizer_metrics(self.engine, skipped),
                    "update_s": time.perf_counter() - started}, {}
        algo, micro = self.recipe.algorithm, self.recipe.train.micro_batch_size
        rows = shard.input_ids.shape[0]
        slices = [slice(i, i + micro) for i in range(0, rows, micro)]
        to = lambda t: t.to(self.device)  # noqa: E731
        ref_logp = [self._logprobs(self.reference, to(shard.input_ids[s])).logp for s in slices] \
            if self.reference is not None else [None] * len(slices)
        # pi_prox, the policy before this batch's update (pi_old of the clip; AReaL's proximal policy). With one
        # update it is the first pass's own log-probs, detached; with more it is computed once, before them.
        prox_logp = [self._logprobs(self.engine, to(shard.input_ids[s])).logp for s in slices] \
            if algo.updates_per_batch > 1 else None
        cap = algo.behaviour_cap  # of the behaviour correction min(pi_prox / pi_behav, C), pi_behav the engine
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        counted = 0.0  # tokens that count in this shard, over the updates
        grads: dict[str, torch.Tensor] = {}
        for update in range(algo.updates_per_batch):
            for index, s in enumerate(slices):
                input_ids, mask, rollout_logp = to(shard.input_ids[s]), to(shard.completion_mask[s]), \
                    to(shard.rollout_logp[s])
                outputs = self.engine(input_ids=input_ids, use_cache=False, output_router_logits=bool(self.moe_classes))
                sampled = sampled_logprobs(outputs.logits, input_ids, **self.sampling, entropy=True)
                logp = sampled.logp
                prox = prox_logp[index] if prox_logp is not None else logp.detach()
                is_weights = truncated_is_weights(prox, rollout_logp, cap) if cap is not None else None
                # this micro-batch's rows' part of the batch-wide loss: their sum / the batch's normaliser
                loss, metrics = policy_loss(
                    logp, prox, to(shard.advantages[s]), mask, eps_low=algo.clip_eps, eps_high=algo.clip_eps_high,
                    beta=algo.kl_coef, ref_logp=ref_logp[index], kl_ratio_weighted=algo.kl_ratio_weighted,
                    aggregation=algo.aggregation, ratio_level=algo.ratio_level, normaliser=shard.loss_normaliser,
                    is_weights=is_weights)
                # summed over micro-batches and learners: the batch loss (the driver averages ranks, hence x world)
                metrics["policy_loss"] = loss.item() * self.world_size
                if self.moe_classes:
                    balance = sum(self._balance(ds_setup.router_logits(outputs), mask, shard.counted_rows).values())
                    metrics["balance_loss"] = balance.item() * self.world_size
                    loss = loss + balance
                metrics["loss"] = loss.item() * self.world_size
                metrics.update(mismatch_metrics(prox, rollout_logp, mask, cap), **losses.masked_means(
                    {"entropy": sampled.entropy, "mismatch/outside_nucleus": sampled.outside}, mask))
                ds_setup.backward_summed(self.engine, loss)
                if capture and update == 0 and index == len(slices) - 1:
                    grads = ds_setup.full_gradients(self.engine)
                self.engine.step()
                tokens = float(mask.sum())
                for key, value in metrics.items():  # shares add up; token means are weighted by their tokens
                    if key in MAXES:
                        maxima[key] = max(maxima.get(key, value), value)
                    else:
                        sums[key] = sums.get(key, 0.0) + (value if key in SHARES else value * tokens)
                counted += tokens
        result = {key: value / algo.updates_per_batch if key in SHARES else value / max(counted, 1.0)
                  for key, value in sums.items()}
        result.update(maxima)
        result["counted_tokens"] = counted / algo.updates_per_batch  # the driver weighs the token means by it
        result.update(**ds_setup.optimizer_metrics(self.engine, skipped), empty_updates=0,
                      update_s=time.perf_counter() - started)
        return result, grads

    def _balance(self, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor, counted_rows: int
                 ) -> dict[str, torch.Tensor]:
        """Balance losses over each completion's tokens (one segment per row), as this micro-batch's part of the
        mean over the batch's `counted_rows` completions: (micro-batch mean) x (its counted rows) / counted_rows."""
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
        segments = torch.where(mask > 0, rows, torch.full_like(rows, -1)).flatten()
        share = losses.counted_rows(mask) / max(counted_rows, 1)
        balance = ds_setup.balance_losses_for(router_logits, segments, self.model_config, self.recipe.moe)
        return {name: value * share for name, value in balance.items()}
