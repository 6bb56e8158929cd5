"""What the gradient-equality tests share between their learner processes and the test: the recipes, the
rollout batch (masked, filler and truncated rows of unequal lengths) and the one-process reference gradient.

`tests/helpers/grad_worker.py` runs real DeepSpeed learners (2 ranks over gloo) on these and saves the full
gradient they apply; `tests/test_exact_gradients.py` computes the reference here and compares.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from align.config import load_grpo_recipe, load_sft_recipe
from align.rl.losses import mismatch_metrics, policy_loss, truncated_is_weights
from align.trainers import engine as ds_setup
from align.trainers.rollout_batch import split_shards
from align.trainers.sft_learner import token_nll_sum
from rollout.sampling import sampled_logprobs

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
PROMPTS, GROUP, MICRO, MAX_NEW = 4, 4, 2, 8  # 16 rows: 8 per learner, 4 micro-batches each
ROWS = PROMPTS * GROUP
# rows kept out of the loss: a masked row (failed reward), a filler group (dynamic sampling), a truncated row
# (truncated: mask); rows 8-9 are one whole micro-batch with nothing that counts
MASKED_ROWS = (2, 8, 9, 10, 11, 13)
NO_BALANCE = ["moe.alpha_expert=0", "moe.alpha_device=0", "moe.alpha_comm=0"]
BALANCE = ["moe.alpha_expert=0.01", "moe.alpha_device=0.05", "moe.alpha_comm=0.02"]

# name -> algorithm fields; every aggregation, with and without TIS, and stale (the decoupled objective: the
# behaviour weight min(pi_prox / pi_behav, 2) against the engine's log-probs, which differ from the learner's)
LOSSES = {
    "grpo": {"aggregation": "seq_mean_token_mean"},
    "dapo": {"aggregation": "token_mean", "clip_eps_high": 0.28},
    "dr_grpo": {"aggregation": "seq_mean_token_sum_norm"},
    "gspo": {"aggregation": "seq_mean_token_mean", "ratio_level": "sequence", "clip_eps": 3e-4,
             "clip_eps_high": 4e-4},
}
VARIANTS = {"on_policy": {}, "tis": {"tis_cap": 1.3}, "off_policy": {"max_staleness": 1}}


def grpo_recipe(zero_stage: int, balance: bool = False, kl_coef: float = 0.0) -> Any:
    return load_grpo_recipe(ROOT / "recipes" / "grpo-tiny.yaml", [
        "model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny",
        f"algorithm.prompts_per_step={PROMPTS}", f"algorithm.group_size={GROUP}", f"algorithm.kl_coef={kl_coef}",
        "algorithm.dynamic_sampling=false", f"train.micro_batch_size={MICRO}", "train.lr=0", "train.max_grad_norm=0",
        f"rollout.max_new_tokens={MAX_NEW}", f"cluster.num_workers={WORLD}", f"deepspeed.zero_stage={zero_stage}",
        *(BALANCE if balance else NO_BALANCE)])


def with_algorithm(recipe: Any, rollout: dict[str, Any] | None = None, **fields: Any) -> Any:
    """The recipe with these algorithm fields (and `rollout` fields) changed."""
    return dataclasses.replace(recipe, algorithm=dataclasses.replace(recipe.algorithm, **fields),
                               rollout=dataclasses.replace(recipe.rollout, **(rollout or {})))


def grpo_cases() -> dict[str, dict[str, Any]]:
    """case name -> algorithm fields (balance losses off); "balance" is grpo with them on; "process" has
    per-token advantages [B, T]; "rank1_masked" leaves nothing that counts in the second learner's shard."""
    cases = {f"{loss}-{variant}": {**LOSSES[loss], **VARIANTS[variant]} for loss in LOSSES for variant in VARIANTS}
    cases["balance"] = dict(LOSSES["grpo"])
    cases["kl"] = {**LOSSES["grpo"], "kl_coef": 0.04}  # k3 KL to a reference that differs from the policy
    cases["kl_ratio_weighted"] = {**LOSSES["dapo"], **VARIANTS["off_policy"], "kl_coef": 0.04,
                                  "kl_ratio_weighted": True}
    cases["process"] = {**LOSSES["dapo"], "advantage": "process"}
    cases["rank1_masked"] = dict(LOSSES["grpo"])
    # sampled with top-k and top-p: log-probs over the kept tokens, most of the random tokens here below the
    # cut-off (kept by the rule of rollout/sampling.py)
    cases["nucleus"] = {**LOSSES["grpo"], **VARIANTS["tis"], "rollout": {"top_k": 20, "top_p": 0.9}}
    return cases


def case_batch(case: str, vocab: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The rollout batch of a case of `grpo_cases`."""
    if case == "rank1_masked":
        return rollout_batch(vocab, pad_id, masked_rows=(2, *range(ROWS // 2, ROWS)))
    return rollout_batch(vocab, pad_id, token_advantages=case == "process")


def rollout_batch(vocab: int, pad_id: int, seed: int = 0, masked_rows: tuple[int, ...] = MASKED_ROWS,
                  token_advantages: bool = False) -> dict[str, torch.Tensor]:
    """16 rows of prompt + completion, right-padded, prompts of 2-5 tokens, completions of 1-8: input_ids,
    completion mask (the rows in `masked_rows` all 0), the engine's log-probs and the advantages: one per row,
    or with `token_advantages` one per token (process supervision's shape, [rows, width])."""
    generator = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(2, 6, (PROMPTS,), generator=generator).repeat_interleave(GROUP)
    completion_len = torch.randint(1, MAX_NEW + 1, (ROWS,), generator=generator)
    width = int((prompt_len + completion_len).max())
    input_ids = torch.full((ROWS, width), pad_id, dtype=torch.long)
    mask = torch.zeros(ROWS, width)
    for row in range(ROWS):
        end = int(prompt_len[row] + completion_len[row])
        input_ids[row, :end] = torch.randint(3, vocab, (end,), generator=generator)
        mask[row, int(prompt_len[row]):end] = 1.0
    mask[list(masked_rows)] = 0.0
    # the engine's log-probs: about the learner's (an untrained model is near -log vocab) +- 0.3, so TIS weights
    # and off-policy ratios are not all 1, and some clip
    noise = (torch.rand(ROWS, width, generator=generator) - 0.5) * 0.6
    rollout_logp = (noise - math.log(vocab)) * (mask > 0)
    advantages = torch.randn(ROWS, generator=generator) * (mask.sum(-1) > 0)
    if token_advantages:
        advantages = torch.randn(ROWS, width, generator=generator) * mask
    return {"input_ids": input_ids, "mask": mask, "rollout_logp": rollout_logp, "advantages": advantages}


def shards(batch: dict[str, torch.Tensor], aggregation: str) -> list[Any]:
    return split_shards(batch["input_ids"], batch["mask"], batch["rollout_logp"], batch["advantages"], WORLD,
                        aggregation, MAX_NEW)


def perturb_reference(reference: torch.nn.Module) -> None:
    """Move the KL reference away from the policy (the same on every rank), so the KL term has a gradient."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)


def grpo_reference(model: torch.nn.Module, recipe: Any, batch: dict[str, torch.Tensor],
                   kl_reference: torch.nn.Module | None = None
                   ) -> tuple[dict[str, torch.Tensor], float, dict[str, float]]:
    """The gradient of ONE `policy_loss` call over the rows that count (Dr. GRPO: all P x G rows, its fixed
    denominator B x L_max), plus, when the recipe's balance losses are on, their mean over those rows in one
    call; the forward runs in the learners' micro-batches (the same numbers, rounded the same way). Returns the
    gradients, the loss and the engine-learner mismatch metrics over the tokens that count."""
    algo, rollout = recipe.algorithm, recipe.rollout
    sampling = {"temperature": rollout.temperature, "top_k": rollout.top_k, "top_p": rollout.top_p}
    rows = torch.arange(ROWS) if algo.aggregation == "seq_mean_token_sum_norm" \
        else torch.nonzero(batch["mask"].sum(-1) > 0).flatten()
    model.zero_grad()
    logps, router = [], []
    for start in range(0, ROWS, MICRO):
        outputs = model(input_ids=batch["input_ids"][start:start + MICRO], use_cache=False, output_router_logits=True)
        logps.append(sampled_logprobs(outputs.logits, batch["input_ids"][start:start + MICRO], **sampling).logp)
        router.append(ds_setup.router_logits(outputs))
    logp, mask = torch.cat(logps)[rows], batch["mask"][rows]
    rollout_logp = batch["rollout_logp"][rows]
    old = logp.detach()  # pi_prox: the learner before the update
    cap = algo.behaviour_cap
    is_weights = truncated_is_weights(old, rollout_logp, cap) if cap is not None else None
    ref_logp = None
    if algo.kl_coef:
        with torch.no_grad():
            ref_logp = torch.cat([sampled_logprobs(kl_reference(input_ids=batch["input_ids"][i:i + MICRO],
                                                                use_cache=False).logits,
                                                   batch["input_ids"][i:i + MICRO], **sampling).logp
                                  for i in range(0, ROWS, MICRO)])[rows]
    loss, _ = policy_loss(logp, old, batch["advantages"][rows], mask, eps_low=algo.clip_eps,
                          eps_high=algo.clip_eps_high, beta=algo.kl_coef, ref_logp=ref_logp,
                          kl_ratio_weighted=algo.kl_ratio_weighted, aggregation=algo.aggregation,
                          ratio_level=algo.ratio_level, max_completion_length=MAX_NEW, is_weights=is_weights)
    moe = recipe.moe
    if moe.alpha_expert or moe.alpha_device or moe.alpha_comm:
        width = batch["mask"].shape[1]
        full_mask = batch["mask"]
        segments = torch.where(full_mask > 0, torch.arange(ROWS)[:, None].expand(ROWS, width), -1).flatten()
        per_layer = tuple(torch.cat([micro[layer] for micro in router]) for layer in range(len(router[0])))
        loss = loss + sum(ds_setup.balance_losses_for(per_layer, segments, model.config, moe).values())
    loss.backward()
    mismatch = mismatch_metrics(old, rollout_logp, mask, cap)
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}, loss.item(), mismatch


def sft_recipe(zero_stage: int, balance: bool) -> Any:
    return load_sft_recipe(ROOT / "recipes" / "sft-tiny.yaml", [
        "train.micro_batch_size=2", "train.grad_accum=3", "data.max_length=48", "train.lr=0",
        "train.max_grad_norm=0", f"cluster.num_workers={WORLD}", f"deepspeed.zero_stage={zero_stage}",
        *(BALANCE if balance else NO_BALANCE)])


def sft_reference(model: torch.nn.Module, recipe: Any, batches: list[dict[str, torch.Tensor]]
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient of the token mean over every target token of the step (all micro-batches of both ranks)
    in one sum / one count, plus the balance losses' mean over every sample of the step in one call."""
    model.zero_grad()
    total, count, router, segments, offset = 0.0, 0, [], [], 0
    for batch in batches:
        outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        attention_mask=batch["attention_mask"], use_cache=False, output_router_logits=True)
        nll, n = token_nll_sum(outputs.logits, batch["labels"])
        total, count = total + nll, count + n
        router.append(ds_setup.router_logits(outputs))
        ids = batch["segment_ids"].flatten()
        segments.append(torch.where(ids >= 0, ids + offset, -1))  # unique over the whole step
        offset += int(ids.max()) + 1
    loss = total / count
    moe = recipe.moe
    if moe.alpha_expert or moe.alpha_device or moe.alpha_comm:
        per_layer = tuple(torch.cat([micro[layer] for micro in router]) for layer in range(len(router[0])))
        loss = loss + sum(ds_setup.balance_losses_for(per_layer, torch.cat(segments), model.config, moe).values())
    loss.backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}, loss.item()
