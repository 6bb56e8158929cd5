"""One reward-model learner: a DeepSpeed engine over a scalar-head model (transformers' sequence-classification
class of the same architecture, num_labels=1) plus its data stream.

The reward of a sequence is the score head at its last non-pad token (transformers' own pooling, which is
why batches are right-padded with the tokenizer's pad id and the config's pad id is set to it). MoE models
keep the DeepSeekMoE balance losses: the sequence-classification wrapper drops the base model's router
logits, so a forward hook on the base model keeps them.

A plain Python object; the driver (align/trainers/rm.py) hosts N of them in Ray actors.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from align.config.rm_schema import RMRecipe
from align.data.preferences import RMBatch, RMStream, collate, load_examples
from align.models.loading import build_model, load_tokenizer, moe_block_classes
from align.rl.rm_losses import pair_metrics, pairwise_loss, pointwise_bce, pointwise_metrics, pointwise_mse
from align.trainers import engine as ds_setup
from align.trainers.learner_group import StreamedLearnerState


class RMLearner(StreamedLearnerState):
    def __init__(self, recipe: RMRecipe, rank: int, world_size: int, master_addr: str, master_port: int,
                 total_steps: int):
        torch.set_num_threads(recipe.cluster.threads_per_worker)
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.loss_kind = recipe.train.loss
        self.backend = ds_setup.init_process_group(rank, world_size, master_addr, master_port,
                                                   recipe.cluster.backend)
        self.tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        ds_setup.seed_everything(recipe.train.seed)  # the new score head starts equal on every rank
        model = build_model(recipe.model, self.tokenizer, scalar_head=True)
        ds_setup.seed_everything(recipe.train.seed + rank)
        self.moe_classes = moe_block_classes(model)
        self._base_output: Any = None
        if self.moe_classes:
            getattr(model, model.base_model_prefix).register_forward_hook(self._keep_base_output)
        self.engine = ds_setup.build_engine(model, self.moe_classes, recipe.deepspeed, recipe.train, world_size,
                                            total_steps)
        self.model_config = self.engine.module.config
        self.device = self.engine.device
        self.stream = RMStream(recipe.data, self.loss_kind, self.tokenizer, rank, world_size,
                               recipe.train.micro_batch_size)
        data = recipe.data
        self.heldout = load_examples(data.heldout, data, self.loss_kind, self.tokenizer,
                                     data.heldout_limit) if data.heldout else []
        self.step = 0

    def _keep_base_output(self, module: Any, inputs: Any, output: Any) -> None:
        self._base_output = output

    def info(self) -> dict[str, Any]:
        params = list(self.engine.module.parameters())
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        return {"parameters": total, "moe": bool(self.moe_classes), "backend": self.backend,
                "model_class": type(self.engine.module).__name__, "device": str(self.device),
                "rows": self.stream.total_rows, "heldout_rows": len(self.heldout)}

    def _rewards(self, batch: RMBatch, with_balance: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards [N] for the batch's sequences and, when asked (MoE), the balance losses of this forward."""
        extra = {"output_router_logits": True} if with_balance else {}
        outputs = self.engine(input_ids=batch.input_ids.to(self.device),
                              attention_mask=batch.attention_mask.to(self.device), use_cache=False, **extra)
        rewards = outputs.logits[:, 0].float()  # [N]
        if not with_balance:
            return rewards, {}
        rows, width = batch.input_ids.shape
        segments = torch.arange(rows).repeat_interleave(width)  # [N * T] sequence index per token, -1 on pads
        segments = torch.where(batch.attention_mask.flatten() > 0, segments, -1).to(self.device)
        base_output, self._base_output = self._base_output, None
        balance = ds_setup.balance_losses_for(ds_setup.router_logits(base_output), segments, self.model_config,
                                              self.recipe.moe)
        return rewards, balance

    def _loss(self, batch: RMBatch) -> tuple[torch.Tensor, dict[str, float]]:
        rewards, balance = self._rewards(batch, with_balance=bool(self.moe_classes))
        targets = batch.targets.to(self.device)
        if self.loss_kind == "pairwise":
            chosen, rejected = rewards.split(len(targets))  # rows are [chosen_1..P, rejected_1..P]
            rm_loss, metrics = pairwise_loss(chosen, rejected, targets), pair_metrics(chosen, rejected)
        else:
            loss_fn = pointwise_mse if self.loss_kind == "mse" else pointwise_bce
            rm_loss = loss_fn(rewards, targets)
            metrics = pointwise_metrics(rewards, targets, binary=self.loss_kind == "bce")
        parts = {"rm_loss": rm_loss.item(), **metrics}
        loss = rm_loss
        if balance:
            for name, value in balance.items():
                parts[f"balance/{name}"] = value.item()
            loss = loss + sum(balance.values())
            parts["balance_loss"] = float(sum(v.item() for v in balance.values()))
        parts["loss"] = loss.item()
        return loss, parts

    def train_step(self) -> dict[str, float]:
        """One optimizer step: grad_accum micro-batches of forward + backward, then the update."""
        started, skipped = time.perf_counter(), self.engine.skipped_steps
        sums: dict[str, float] = {"tokens": 0, "samples": 0, "data/truncated": 0}
        for _ in range(self.recipe.train.grad_accum):
            batch = self.stream.next_batch()
            loss, parts = self._loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["tokens"] += batch.num_tokens
            sums["samples"] += len(batch.targets)
            sums["data/truncated"] += batch.truncated
        self.step += 1
        accum = self.recipe.train.grad_accum
        counts = ("tokens", "samples", "data/truncated")
        metrics = {key: (value if key in counts else value / accum) for key, value in sums.items()}
        metrics.update(**ds_setup.optimizer_metrics(self.engine, skipped), epoch=self.stream.epoch_progress,
                       compute_s=time.perf_counter() - started)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, list]:
        """Collective: rewards of this rank's share of the held-out rows (every rank runs the same number of
        forward passes, as ZeRO-3 requires; the shorter shards repeat a row whose result is dropped)."""
        if not self.heldout:
            return {"rewards": [], "rejected": [], "targets": [], "categories": []}
        per_rank = math.ceil(len(self.heldout) / self.world_size)
        mine = self.heldout[self.rank :: self.world_size]
        padded = mine + [self.heldout[0]] * (per_rank - len(mine))
        size = self.recipe.train.micro_batch_size
        first: list[float] = []
        second: list[float] = []
        self.engine.eval()
        try:
            for start in range(0, per_rank, size):
                batch = collate(padded[start : start + size], self.tokenizer.pad_token_id)
                rewards, _ = self._rewards(batch, with_balance=False)
                if self.loss_kind == "pairwise":
                    chosen, rejected = rewards.split(len(batch.targets))
                    first += chosen.tolist()
                    second += rejected.tolist()
                else:
                    first += rewards.tolist()
        finally:
            self.engine.train()
        kept = len(mine)
        return {"rewards": first[:kept], "rejected": second[:kept], "targets": [e.target for e in mine],
                "categories": [e.category for e in mine]}
