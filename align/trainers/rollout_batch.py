"""A rollout batch as the learners take it: completions -> padded tensors -> one shard per learner.

No Ray here: the GPU check script and tests build shards directly.
"""

from __future__ import annotations

import torch

from align.data.prompts import Prompt
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
                 learners: int) -> list[RolloutShard]:
    """Equal contiguous slices for the learners, each told the batch-wide token and row counts."""
    per = input_ids.shape[0] // learners
    global_tokens, global_rows = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    part = [slice(i * per, (i + 1) * per) for i in range(learners)]
    return [RolloutShard(input_ids[s], mask[s], rollout_logp[s], advantages[s], global_tokens, global_rows)
            for s in part]
