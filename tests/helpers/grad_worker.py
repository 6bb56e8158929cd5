"""One learner rank of the gradient-equality tests: `python -m tests.helpers.grad_worker MODE ZERO RANK PORT OUT`.

MODE grpo: a real GRPOLearner (DeepSpeed, gloo) takes one update per case of `gradients.grpo_cases()` on its
shard of `gradients.rollout_batch`, with the case's algorithm set on the (plain Python) learner; the full
gradient at the accumulation boundary goes to OUT/grpo-CASE-rankR.pt. MODE sft: a real SFTLearner takes one
optimizer step with balance losses off and one with them on; the micro-batches it read and its gradient go to
OUT/sft-CASE-rankR.pt. Rank 0 also writes the starting weights (OUT/weights-MODE.pt); lr 0 keeps them. MODE
bf16: a GRPOLearner training in DeepSpeed bf16 with a KL term takes one update; its KL, its reference's dtype
and the KL a float32 reference (the starting policy upcast) would have given go to OUT/bf16-rankR.pt.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from tests.helpers import gradients


def main(mode: str, zero_stage: int, rank: int, port: int, out: Path) -> None:
    torch.manual_seed(0)
    if mode == "grpo":
        from align.trainers.grpo_learner import GRPOLearner

        base = gradients.grpo_recipe(zero_stage)
        # built with a KL term, so that it holds a reference (the cases without one set kl_coef 0)
        learner = GRPOLearner(gradients.grpo_recipe(zero_stage, kl_coef=0.04), rank, gradients.WORLD, "127.0.0.1",
                              port)
        save_weights(learner.policy_state(), rank, out / "weights-grpo.pt")
        gradients.perturb_reference(learner.reference)
        save_weights(learner.reference.state_dict(), rank, out / "weights-reference.pt")
        tokenizer = learner.tokenizer
        balanced = gradients.grpo_recipe(zero_stage, balance=True)
        for case, fields in gradients.grpo_cases().items():
            learner.recipe = gradients.with_algorithm(balanced if case == "balance" else base, **fields)
            batch = gradients.case_batch(case, len(tokenizer), tokenizer.pad_token_id)
            shard = gradients.shards(batch, learner.recipe.algorithm.aggregation)[rank]
            metrics, grads = learner.update_gradients(shard)
            torch.save({"grads": grads, "metrics": metrics}, out / f"grpo-{case}-rank{rank}.pt")
        # a batch in which nothing counts (every group a filler): no optimizer step is taken
        everything = tuple(range(gradients.ROWS))
        empty = gradients.rollout_batch(len(tokenizer), tokenizer.pad_token_id, masked_rows=everything)
        learner.recipe = base
        metrics = learner.update(gradients.shards(empty, base.algorithm.aggregation)[rank])
        torch.save({"metrics": metrics, "steps": learner.engine.global_steps}, out / f"grpo-empty-rank{rank}.pt")
    elif mode == "bf16":
        from align.models.loading import build_model
        from align.rl.losses import kl_k3
        from align.trainers.grpo_learner import GRPOLearner

        recipe = gradients.grpo_recipe(zero_stage, kl_coef=0.04)
        recipe = dataclasses.replace(recipe, deepspeed=dataclasses.replace(recipe.deepspeed, precision="bf16"))
        learner = GRPOLearner(recipe, rank, gradients.WORLD, "127.0.0.1", port)
        batch = gradients.case_batch("grpo-on_policy", len(learner.tokenizer), learner.tokenizer.pad_token_id)
        shard = gradients.shards(batch, recipe.algorithm.aggregation)[rank]
        float32 = build_model(recipe.model, learner.tokenizer).eval()
        float32.load_state_dict(learner.policy_state(all_ranks=True))
        ids, mask = shard.input_ids, shard.completion_mask
        policy = learner._logprobs(learner.engine, ids).logp
        float32_kl = (kl_k3(policy, learner._logprobs(float32, ids).logp) * mask).sum() / mask.sum()
        metrics = learner.update(shard)
        torch.save({"kl": metrics["kl"], "float32_reference_kl": float32_kl.item(),
                    "reference_dtype": str(next(learner.reference.parameters()).dtype),
                    "policy_dtype": str(next(learner.engine.module.parameters()).dtype)}, out / f"bf16-rank{rank}.pt")
    else:
        from align.trainers.sft_learner import SFTLearner

        recipe = gradients.sft_recipe(zero_stage, balance=False)
        learner = SFTLearner(recipe, rank, gradients.WORLD, "127.0.0.1", port, total_steps=4)
        save_weights(gathered_state(learner, zero_stage), rank, out / "weights-sft.pt")
        read = []
        next_batch = learner.stream.next_batch

        def recording() -> object:
            batch = next_batch()
            read.append({field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)})
            return batch

        learner.stream.next_batch = recording
        for case, balance in (("no_balance", False), ("balance", True)):
            learner.recipe = gradients.sft_recipe(zero_stage, balance)
            read.clear()
            metrics, grads = learner.train_step_gradients()
            torch.save({"grads": grads, "metrics": metrics, "batches": list(read)}, out / f"sft-{case}-rank{rank}.pt")


def gathered_state(learner, zero_stage: int) -> dict[str, torch.Tensor] | None:
    from align.models.export import full_state_dict, gathered

    with gathered(learner.engine.module, zero_stage):
        return full_state_dict(learner.engine.module) if learner.rank == 0 else None


def save_weights(state: dict[str, torch.Tensor] | None, rank: int, path: Path) -> None:
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, path)


if __name__ == "__main__":
    mode, zero, rank, port, out = sys.argv[1:6]
    main(mode, int(zero), int(rank), int(port), Path(out))
