"""The rollout batch helpers the GRPO driver uses: group selection and DAPO dynamic sampling's batch fill."""

from __future__ import annotations

import torch

from align.data.prompts import Prompt
from align.trainers.rollout_batch import ScoredGroups, fill_batch, rollout_tensors
from rollout.torch_engine import Completion


def groups(rewards: list[list[float]]) -> ScoredGroups:
    """Groups whose completions carry their group and position in the tokens, to follow them around."""
    prompts = [Prompt([{"role": "user", "content": str(p)}], [100 + p], str(p), f"f:{p}") for p in range(len(rewards))]
    completions = [Completion(p, [p, i], [-0.5, -0.5], finished=True)
                   for p, row in enumerate(rewards) for i in range(len(row))]
    return ScoredGroups(prompts, completions, torch.tensor(rewards), torch.ones(len(rewards), len(rewards[0])))


def test_select_renumbers_groups_and_keeps_their_completions():
    picked = groups([[0, 1], [1, 1], [2, 0]]).select([2, 0])
    assert [p.answer for p in picked.prompts] == ["2", "0"]
    assert [(c.prompt_index, c.token_ids) for c in picked.completions] == [(0, [2, 0]), (0, [2, 1]), (1, [0, 0]),
                                                                           (1, [0, 1])]
    assert picked.rewards.tolist() == [[2, 0], [0, 1]]


def test_concat_offsets_prompt_indices():
    both = ScoredGroups.concat([groups([[0, 1]]), groups([[5, 5], [1, 0]])])
    assert [c.prompt_index for c in both.completions] == [0, 0, 1, 1, 2, 2]
    assert both.rewards.shape == (3, 2)
    input_ids, mask, _ = rollout_tensors(both.prompts, both.completions, pad_id=0)
    assert input_ids[4].tolist() == [101, 1, 0]  # prompt 1 of the second part is now prompt 2


def test_fill_batch_takes_informative_groups_first_in_order():
    sampled = groups([[1, 1], [0, 1], [3, 3], [1, 0], [2, 0]])
    batch = fill_batch(sampled, informative=[1, 3, 4], prompts_per_step=2)
    assert [p.answer for p in batch.prompts] == ["1", "3"]
    assert batch.in_loss.tolist() == [[1, 1], [1, 1]]


def test_fill_batch_tops_up_with_zero_std_groups_kept_out_of_the_loss():
    sampled = groups([[1, 1], [0, 1], [3, 3]])
    batch = fill_batch(sampled, informative=[1], prompts_per_step=3)
    assert [p.answer for p in batch.prompts] == ["1", "0", "2"]
    assert batch.in_loss.tolist() == [[1, 1], [0, 0], [0, 0]]
    assert len(batch.completions) == 6
