"""One SFT learner: a DeepSpeed engine over the policy plus its data stream.

A plain Python object. The driver wraps N of them in Ray actors (align/distributed/worker_group.py);
tests and the GPU check script can use one directly.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from align.config.schema import SFTRecipe
from align.data.chat import IGNORE_INDEX
from align.data.packing import Batch
from align.data.stream import SFTStream
from align.models.loading import load_tokenizer
from align.trainers import engine as ds_setup
from align.trainers.learner_group import StreamedLearnerState


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token negative log-likelihood summed over target tokens, and their count N.

    sum = -sum_{t: labels[t+1] != ignore} log p(labels[t+1] | tokens <= t)
    logits: [rows, width, vocab]; labels: [rows, width]. Returns (sum, N). The token mean of an optimizer step
    is sum / N with both summed over the step's micro-batches and learners (`SFTLearner.train_step`).
    """
    targets = labels[:, 1:]
    count = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, count


class SFTLearner(StreamedLearnerState):
    def __init__(self, recipe: SFTRecipe, rank: int, world_size: int, master_addr: str, master_port: int,
                 total_steps: int):
        torch.set_num_threads(recipe.cluster.threads_per_worker)
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.backend = ds_setup.init_process_group(rank, world_size, master_addr, master_port,
                                                   recipe.cluster.backend)
        ds_setup.seed_everything(recipe.train.seed + rank)
        self.tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        self.engine, self.moe_classes = ds_setup.build_policy_engine(
            recipe.model, recipe.lora, recipe.deepspeed, recipe.train, world_size, total_steps, self.tokenizer)
        self.model_config = self.engine.module.config
        self.device = self.engine.device
        self.stream = SFTStream(recipe.data, self.tokenizer, rank, world_size, recipe.train.micro_batch_size)
        self.step = 0

    def info(self) -> dict[str, Any]:
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in self.engine.module.parameters() if p.requires_grad)
        return {"parameters": total, "trainable": trainable, "moe": bool(self.moe_classes),
                "backend": self.backend, "device": str(self.device), "rows": self.stream.total_rows}

    def train_step(self) -> dict[str, float]:
        return self._train_step(capture=False)[0]

    def train_step_gradients(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """`train_step`, also returning the full gradient of every trainable parameter at the accumulation
        boundary, before clipping and the optimizer step (a collective under ZeRO-3), for tests and debugging."""
        return self._train_step(capture=True)

    def _train_step(self, capture: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One optimizer step: grad_accum micro-batches of forward + backward, then the update.

        The loss is the token mean over every target token of the step, all micro-batches of all learners:

            L = sum_{micro, ranks} nll_sum / N_step,   N_step = all-reduced target count of the step

        so a micro-batch with few targets weighs no more per token than a full one (the step's micro-batches
        are read first to count them). The MoE balance losses are means over the step's samples the same way.
        Cost per step: one all-reduce of two float64 counts (16 bytes), and the step's micro-batches held at
        once (grad_accum x micro_batch_size x max_length token ids: 8 x 4 x 4096 x 8 bytes x 4 tensors = 4 MB for
        a DeepSeek-V2-Lite recipe), whatever the model size.
        """
        started, skipped = time.perf_counter(), self.engine.skipped_steps
        batches = [self.stream.next_batch() for _ in range(self.recipe.train.grad_accum)]
        step_targets, step_samples = ds_setup.all_ranks_sum(
            [sum(b.num_target_tokens for b in batches), sum(b.num_samples for b in batches)], self.device)
        sums = {"loss": 0.0, "lm_loss": 0.0, "balance_loss": 0.0, "tokens": 0, "target_tokens": 0, "samples": 0}
        grads: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(batches):
            loss, parts = self._loss(batch, step_targets, step_samples)
            ds_setup.backward_summed(self.engine, loss)
            if capture and index == len(batches) - 1:
                grads = ds_setup.full_gradients(self.engine)
            self.engine.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["tokens"] += batch.num_tokens
            sums["target_tokens"] += batch.num_target_tokens
            sums["samples"] += batch.num_samples
        self.step += 1
        # each loss part is this rank's share of the step's value; the driver averages ranks, hence x world
        shares = lambda key: "loss" in key or key.startswith("balance/")  # noqa: E731
        metrics = {key: value * self.world_size if shares(key) else value for key, value in sums.items()}
        metrics.update(
            **ds_setup.optimizer_metrics(self.engine, skipped), epoch=self.stream.epoch_progress,
            compute_s=time.perf_counter() - started, **{f"data/{k}": v for k, v in self.stream.counters.items()})
        return metrics, grads

    def _loss(self, batch: Batch, step_targets: float, step_samples: float) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss: nll sum / the step's target tokens, plus the balance
        losses' micro-batch means x (its samples / the step's samples)."""
        moe = bool(self.moe_classes)
        outputs = self.engine(
            input_ids=batch.input_ids.to(self.device), position_ids=batch.position_ids.to(self.device),
            attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(self.device),
            output_router_logits=moe, use_cache=False)
        nll_sum, _ = token_nll_sum(outputs.logits, batch.labels.to(self.device))
        lm_loss = nll_sum / max(step_targets, 1.0)
        parts = {"lm_loss": lm_loss.item()}
        loss = lm_loss
        if moe:
            segments = batch.segment_ids.to(self.device).flatten()
            share = batch.num_samples / max(step_samples, 1.0)
            balance = {name: value * share for name, value in ds_setup.balance_losses_for(
                ds_setup.router_logits(outputs), segments, self.model_config, self.recipe.moe).items()}
            for name, value in balance.items():
                parts[f"balance/{name}"] = value.item()
            loss = loss + sum(balance.values())
            parts["balance_loss"] = float(sum(v.item() for v in balance.values()))
        parts["loss"] = loss.item()
        return loss, parts

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The policy's logits for a batch [rows, width] (collective under ZeRO-3), as a CPU tensor."""
        self.engine.eval()
        try:
            return self.engine(input_ids=input_ids.to(self.device), use_cache=False).logits.float().cpu()
        finally:
            self.engine.train()
