"""A rollout batch as the learners take it: completions -> padded tensors -> one shard per learner.

No Ray here: the GPU check script and tests build shards directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from align.data.prompts import Prompt
from align.rl.losses import Aggregation, loss_normaliser
from align.trainers.grpo_learner import RolloutShard
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


def split_shards(input_ids: torch.Tensor, mask: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor,
                 learners: int, aggregation: Aggregation, max_completion_length: int) -> list[RolloutShard]:
    """Equal contiguous slices for the learners, each told the whole batch's loss normaliser (`loss_normaliser`
    over every row, so each learner's loss is its rows' part of one batch-wide aggregate) and counted rows."""
    per = input_ids.shape[0] // learners
    normaliser = loss_normaliser(mask, aggregation, max_completion_length)
    counted_rows = int((mask.sum(-1) > 0).sum())
    part = [slice(i * per, (i + 1) * per) for i in range(learners)]
    return [RolloutShard(input_ids[s], mask[s], rollout_logp[s], advantages[s], normaliser, counted_rows)
            for s in part]


@dataclass
class ScoredGroups:
    """One step's sampled groups: P prompts with G scored completions each, completions in prompt order."""

    prompts: list[Prompt]
    completions: list[Completion]  # [P * G]; completion.prompt_index indexes `prompts`
    rewards: torch.Tensor  # [P, G] total reward after the truncation rule
    in_loss: torch.Tensor  # [P, G] 1.0 where the completion enters the loss (truncated=mask zeroes some)

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
        return ScoredGroups([self.prompts[i] for i in groups], completions, self.rewards[index], weight)

    @staticmethod
    def concat(parts: list[ScoredGroups]) -> ScoredGroups:
        prompts, completions, offset = [], [], 0
        for part in parts:
            prompts += part.prompts
            completions += [dataclasses.replace(c, prompt_index=c.prompt_index + offset) for c in part.completions]
            offset += len(part.prompts)
        return ScoredGroups(prompts, completions, torch.cat([p.rewards for p in parts]),
                            torch.cat([p.in_loss for p in parts]))


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
