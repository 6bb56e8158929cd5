"""Per-step rewards for process supervision (DeepSeekMath, arXiv 2402.03300, section 4.1.3), as pure functions.

Rewards score steps by character offsets into the decoded completion (`rewards.base.Step`); the policy loss
needs token positions. The driver merges the rewards' steps of each completion (`merge_steps`), maps their
character ends to token ends (`step_token_ends`), and pads them into the tensors `process_advantages` takes
(`step_tensors`):

    merged = merge_steps(steps_of_i, weights, values_of_i, len(text_i))            # [(score, char end)]
    ends = step_token_ends(token_ids_i, [end for _, end in merged], decode)
    step_rewards, step_mask, step_ends = step_tensors(per_completion, group_size)  # [P, G, S] each
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewards.base import Step


def step_token_ends(token_ids: list[int], char_ends: list[int], decode: Callable[[list[int]], str]) -> list[int]:
    """The token end of each step: for character end c, the smallest k with

        len(decode(token_ids[:k])) >= c,        k clamped to len(token_ids) when no prefix is that long,

    so the step's last character lies in token k - 1 and [.., k) is its half-open token range, the
    `step_ends` of `process_advantages`. A token holding characters of two steps goes to the first.

    Binary search over k for each step: O(S log T) decodes for S steps of T tokens, assuming the decoded
    length never shrinks as tokens are added (true of BPE tokenizers decoding whole characters).

    Args:
        token_ids: the completion's T token ids.
        char_ends: S exclusive character ends into decode(token_ids).
        decode: the tokenizer's decode, as the completion text was made, e.g.
            `lambda ids: tokenizer.decode(ids, skip_special_tokens=True)`.

    Returns:
        S token ends in [0, T].
    """
    lengths: dict[int, int] = {}  # k -> len(decode(token_ids[:k])), shared by the searches

    def decoded_length(k: int) -> int:
        if k not in lengths:
            lengths[k] = len(decode(token_ids[:k]))
        return lengths[k]

    ends = []
    for char_end in char_ends:
        low, high = 0, len(token_ids)  # the answer lies in [low, high]; high when no prefix reaches char_end
        while low < high:
            middle = (low + high) // 2
            if decoded_length(middle) >= char_end:
                high = middle
            else:
                low = middle + 1
        ends.append(low)
    return ends


def step_tensors(steps: list[list[tuple[float, int]]], group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-completion steps into `process_advantages`' inputs.

        step_rewards[p, g, s] = score of step s of completion p * G + g,   0.0 past its last step
        step_mask[p, g, s]    = s < number of steps of that completion
        step_ends[p, g, s]    = its token end,                             0 past its last step

    Args:
        steps: P * G lists of (score, token end), prompt-major; an empty list for a completion without steps.
        group_size: G.

    Returns:
        (step_rewards [P, G, S] float32, step_mask [P, G, S] bool, step_ends [P, G, S] long), S the most
        steps of any completion (at least 1).
    """
    if group_size < 1 or len(steps) % group_size:
        raise ValueError(f"{len(steps)} completions do not split into groups of {group_size}")
    prompts = len(steps) // group_size
    most = max([len(completion) for completion in steps] + [1])
    rewards = torch.zeros(len(steps), most)
    mask = torch.zeros(len(steps), most, dtype=torch.bool)
    ends = torch.zeros(len(steps), most, dtype=torch.long)
    for i, completion in enumerate(steps):
        if completion:
            rewards[i, : len(completion)] = torch.tensor([score for score, _ in completion], dtype=torch.float32)
            ends[i, : len(completion)] = torch.tensor([end for _, end in completion], dtype=torch.long)
            mask[i, : len(completion)] = True
    shape = (prompts, group_size, most)
    return rewards.view(shape), mask.view(shape), ends.view(shape)


def merge_steps(per_reward: dict[str, list[Step] | None], weights: dict[str, float],
                outcome: dict[str, float | None], completion_chars: int) -> list[tuple[float, int]] | None:
    """The steps of one completion for process supervision, over all of the recipe's rewards k:

        steps = sorted by end (stable) of   { (c_k * score, end) for each step of R_k }   if R_k gave steps
                                            { (c_k * R_k, completion_chars) }             else

    i.e. a reward without steps (None or an empty list) counts as one step over the whole completion,
    scoring its weighted outcome value. None when a reward has neither steps nor a value (its call failed):
    the completion then has no valid reward, as in `rewards.combine.combine_rewards`.

    Args:
        per_reward: reward name -> this completion's steps (character ends), or None.
        weights: reward name -> c_k.
        outcome: reward name -> this completion's outcome value, or None.
        completion_chars: the length of the decoded completion.

    Returns:
        [(weighted score, character end)] ordered by end, or None.
    """
    merged: list[tuple[float, int]] = []
    for name in dict.fromkeys([*per_reward, *outcome]):
        steps, value = per_reward.get(name), outcome.get(name)
        if steps:
            merged.extend((weights[name] * step.score, step.end) for step in steps)
        elif value is not None:
            merged.append((weights[name] * value, completion_chars))
        else:
            return None
    return sorted(merged, key=lambda step: step[1])
