"""The rollout batch helpers the GRPO driver uses: group selection and DAPO dynamic sampling's batch fill."""

from __future__ import annotations

import pytest
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


def test_process_supervision_advantages_from_a_step_reward_land_on_each_steps_tokens():
    """math_steps on real tokenized completions -> per-token advantages in the rows' layout, by hand."""
    from align.models.loading import load_tokenizer
    from align.trainers.reward_pool import RewardValues
    from align.trainers.rollout_batch import completion_steps, process_token_advantages
    from rewards.base import Sample
    from rewards.math import math_steps
    from tests.conftest import TINY_TOKENIZER

    tokenizer = load_tokenizer(str(TINY_TOKENIZER))
    texts = ["1 + 1 = 2\n#### 2", "1 + 1 = 3\n#### 3", "1 + 1 = 2\n#### 2"]  # right, wrong, a filler's
    prompts = [Prompt([{"role": "user", "content": "1 + 1 ="}], [7, 8, 9], "2", "f:1", {"answer": "2"}),
               Prompt([{"role": "user", "content": "2 + 2 ="}], [7, 8], "4", "f:2", {"answer": "4"})]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    completions = [Completion(0, ids[0], [0.0] * len(ids[0]), True), Completion(0, ids[1], [0.0] * len(ids[1]), True),
                   Completion(1, ids[2], [0.0] * len(ids[2]), True), Completion(1, ids[2], [0.0] * len(ids[2]), True)]
    decoded = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    assert decoded[:2] == texts[:2]
    scores = math_steps([Sample(prompts[c.prompt_index].messages, text, prompts[c.prompt_index].row)
                         for c, text in zip(completions, decoded)])
    scored = RewardValues({"math_steps": scores.values}, steps={"math_steps": scores.steps})
    rewards = torch.tensor(scores.values)
    steps = completion_steps(completions, decoded, scored, rewards, {"math_steps": 1.0}, tokenizer)
    newline = ids[0].index(tokenizer.encode("\n", add_special_tokens=False)[0])
    assert steps[0] == [(1.0, newline + 1), (1.0, len(ids[0]))]  # the first line, newline included; the answer
    assert steps[1] == [(0.0, newline + 1), (0.0, len(ids[1]))]
    batch = ScoredGroups(prompts, completions, rewards.view(2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]), steps)
    input_ids, _, _ = rollout_tensors(prompts, completions, pad_id=0)
    advantages = process_token_advantages(batch, input_ids.shape[1])
    # group 0's four steps (1, 1, 0, 0): mean 0.5, std sqrt(1/3); each normalised +-0.5 / sqrt(1/3) = +-0.866
    unit = 0.5 / (1 / 3) ** 0.5 / (1 + 1e-4 / (1 / 3) ** 0.5)  # (r - mean) / (std + eps)
    first = torch.zeros(input_ids.shape[1])
    first[3:3 + newline + 1] = 2 * unit  # tokens of step 1 collect steps 1 and 2
    first[3 + newline + 1:3 + len(ids[0])] = unit
    torch.testing.assert_close(advantages[0], first)
    torch.testing.assert_close(advantages[1, :3 + len(ids[1])], -first[:3 + len(ids[1])])
    # the second group (a filler: its rows' mask keeps it out of the loss) is normalised on its own: steps
    # (1, 0, 1, 0) for the answer 4, so the first line's tokens get +unit - unit = 0 and the answer's -unit
    filler = torch.zeros(input_ids.shape[1])
    filler[2 + newline + 1:2 + len(ids[2])] = -unit
    torch.testing.assert_close(advantages[2], filler)
    torch.testing.assert_close(advantages[3], filler)


def test_process_supervision_keeps_groups_whose_steps_differ_even_when_their_outcomes_agree():
    from align.trainers.rollout_batch import process_informative_groups

    batch = groups([[1, 1], [1, 1], [0, 1]])
    batch.steps = [[(1.0, 1), (1.0, 2)], [(1.0, 1), (1.0, 2)],  # every step right: no signal
                   [(0.0, 1), (1.0, 2)], [(1.0, 1), (1.0, 2)],  # both answers right, one wrong step: signal
                   [(1.0, 2)], [(0.0, 2)]]
    assert process_informative_groups(batch) == [1, 2]
    assert fill_batch(batch, process_informative_groups(batch), prompts_per_step=2).steps == batch.steps[2:]


def test_learner_metrics_merge_token_means_by_tokens_and_loss_shares_by_mean():
    from align.trainers.grpo_learner import merge_learner_metrics

    ranks = [{"loss": 0.6, "kl": 0.02, "ratio_mean": 1.0, "counted_tokens": 30.0, "lr": 1e-5},
             {"loss": 0.2, "kl": 0.0, "ratio_mean": 0.0, "counted_tokens": 0.0, "lr": 1e-5}]  # nothing counted
    merged = merge_learner_metrics(ranks)
    assert merged["loss"] == pytest.approx(0.4)  # each is its share x 2: the mean is the sum of the shares
    assert merged["kl"] == pytest.approx(0.02) and merged["ratio_mean"] == 1.0  # the empty learner weighs 0
    assert merged["lr"] == 1e-5
