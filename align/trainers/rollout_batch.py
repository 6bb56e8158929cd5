"""A rollout batch as the learners take it: completions -> padded tensors -> one shard per learner.

No Ray here: the GPU check script and tests build shards directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from align.data.prompts import Prompt
from align.rl.advantages import process_advantages
from align.rl.losses import Aggregation, counted_rows, loss_normaliser
from align.rl.steps import decoded_prefix_lengths, merge_steps, step_tensors, step_token_ends
from align.trainers.grpo_learner import RolloutShard
from align.trainers.reward_pool import RewardValues
from rollout.torch_engine import Completion


def rollout_tensors(prompts: list[Prompt], completions: list[Completion], pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of prompt + completion, right-padded: (input_ids, completion_mask, rollout_logp), each [N, width]."""
    width = max(len(prompts[c.prompt_index].token_ids) + len(c.token_ids) for c in completions)
    input_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width))
    rollout_logp = torch.zeros((len(completions), width))
    for r, completion in enumerate(completions):
        prompt = prompts[completion.prompt_index].token_ids
        end = len(prompt) + len(completion.token_ids)
        input_ids[r, :end] = torch.tensor(prompt + completion.token_ids)
        mask[r, len(prompt):end] = 1.0
        rollout_logp[r, len(prompt):end] = torch.tensor(completion.logprobs)
    return input_ids, mask, rollout_logp


def completion_values_to_rows(values: torch.Tensor, prompts: list[Prompt], completions: list[Completion],
                              width: int) -> torch.Tensor:
    """Per-token values of each completion [N, T] (token t of completion i at [i, t]) placed at that token's
    position in its `rollout_tensors` row [N, width] (after its prompt); 0 on prompt and padding."""
    rows = values.new_zeros(len(completions), width)
    for r, completion in enumerate(completions):
        start, length = len(prompts[completion.prompt_index].token_ids), len(completion.token_ids)
        rows[r, start:start + length] = values[r, :length]
    return rows


def split_shards(input_ids: torch.Tensor, mask: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor,
                 learners: int, aggregation: Aggregation, max_completion_length: int) -> list[RolloutShard]:
    """Equal contiguous slices for the learners, each told the whole batch's loss normaliser (`loss_normaliser`
    over every row, so each learner's loss is its rows' part of one batch-wide aggregate) and counted rows."""
    per = input_ids.shape[0] // learners
    normaliser, rows = loss_normaliser(mask, aggregation, max_completion_length), counted_rows(mask)
    part = [slice(i * per, (i + 1) * per) for i in range(learners)]
    return [RolloutShard(input_ids[s], mask[s], rollout_logp[s], advantages[s], normaliser, rows) for s in part]


@dataclass
class ScoredGroups:
    """One step's sampled groups: P prompts with G scored completions each, completions in prompt order."""

    prompts: list[Prompt]
    completions: list[Completion]  # [P * G]; completion.prompt_index indexes `prompts`
    rewards: torch.Tensor  # [P, G] total reward after the truncation rule
    in_loss: torch.Tensor  # [P, G] 1.0 where the completion enters the loss (truncated=mask zeroes some)
    steps: list[list[tuple[float, int]]] | None = None  # process supervision: per completion (score, token end)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def select(self, groups: list[int], in_loss: bool = True) -> ScoredGroups:
        """The listed groups, renumbered 0..K-1; `in_loss=False` keeps them out of the loss (fillers)."""
        size = self.group_size
        completions = [dataclasses.replace(c, prompt_index=new)
                       for new, old in enumerate(groups) for c in self.completions[old * size:(old + 1) * size]]
        index = torch.tensor(groups, dtype=torch.long)
        weight = self.in_loss[index] if in_loss else torch.zeros(len(groups), size)
        steps = None if self.steps is None else [self.steps[old * size + g] for old in groups for g in range(size)]
        return ScoredGroups([self.prompts[i] for i in groups], completions, self.rewards[index], weight, steps)

    @staticmethod
    def concat(parts: list[ScoredGroups]) -> ScoredGroups:
        prompts, completions, offset = [], [], 0
        for part in parts:
            prompts += part.prompts
            completions += [dataclasses.replace(c, prompt_index=c.prompt_index + offset) for c in part.completions]
            offset += len(part.prompts)
        steps = None if any(p.steps is None for p in parts) else [s for p in parts for s in p.steps]
        return ScoredGroups(prompts, completions, torch.cat([p.rewards for p in parts]),
                            torch.cat([p.in_loss for p in parts]), steps)


def fill_batch(sampled: ScoredGroups, informative: list[int], prompts_per_step: int) -> ScoredGroups:
    """DAPO dynamic sampling's batch: the first `prompts_per_step` informative groups; if too few were
    found, the rest of the batch is zero-std groups kept out of the loss, so every step has the same shape
    (P x G rows) and only informative groups move the policy."""
    chosen = sampled.select(informative[:prompts_per_step])
    missing = prompts_per_step - len(chosen.prompts)
    if missing <= 0:
        return chosen
    skipped = set(informative)
    fillers = [g for g in range(len(sampled.prompts)) if g not in skipped][:missing]
    return ScoredGroups.concat([chosen, sampled.select(fillers, in_loss=False)])


def completion_steps(completions: list[Completion], texts: list[str], scored: RewardValues, rewards: torch.Tensor,
                     weights: dict[str, float], tokenizer: Any) -> list[list[tuple[float, int]]]:
    """Process supervision: each completion's weighted step rewards with their token ends (`merge_steps`, then
    `step_token_ends`). A reward that scores no steps counts as one step at the end; a completion whose reward
    call failed has its total reward (the recipe's fallback) as its one step, or no step when it has none (it is
    then out of the loss).

    Args:
        completions, texts: the sampled completions and their text (decoded, special tokens skipped).
        scored: the reward pool's values and steps, per reward name.
        rewards: [N] total reward of each completion (NaN where invalid).
        weights: reward name -> c_k.
        tokenizer: the tokenizer that decoded `texts`.
    """
    per_completion = []
    for i, (completion, text) in enumerate(zip(completions, texts)):
        merged = merge_steps({name: column[i] for name, column in scored.steps.items()}, weights,
                             {name: column[i] for name, column in scored.values.items()}, len(text))
        if merged is None:
            merged = [] if rewards[i].isnan() else [(float(rewards[i]), len(text))]
        lengths = decoded_prefix_lengths(completion.token_ids, tokenizer, text)
        ends = step_token_ends(lengths, [end for _, end in merged])
        per_completion.append([(score, end) for (score, _), end in zip(merged, ends)])
    return per_completion


def process_token_advantages(batch: ScoredGroups, width: int) -> torch.Tensor:
    """Process-supervision advantages (DeepSeekMath 4.1.3) in the rows' layout [P * G, width]: every step of the
    group's completions normalised over the group, each token getting the sum over its own step and the later
    ones (`process_advantages`). As in outcome supervision, a completion kept out of the loss (truncated=mask)
    still counts in its group's statistics; one without a valid reward has no step."""
    step_rewards, step_mask, step_ends = step_tensors(batch.steps, batch.group_size)
    longest = max(len(c.token_ids) for c in batch.completions)
    per_token = process_advantages(step_rewards, step_mask, step_ends, num_tokens=longest)  # [P, G, T]
    return completion_values_to_rows(per_token.flatten(0, 1), batch.prompts, batch.completions, width)


def process_informative_groups(batch: ScoredGroups) -> list[int]:
    """DAPO dynamic sampling under process supervision: the groups whose step rewards are not all equal, so that
    `process_advantages` gives some token a non-zero advantage (a group whose answers are all right can still
    differ in its steps)."""
    size, informative = batch.group_size, []
    for p in range(len(batch.prompts)):
        scores = [score for g in range(size) for score, _ in batch.steps[p * size + g]]
        if scores and max(scores) > min(scores):
            informative.append(p)
    return informative
