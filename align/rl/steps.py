"""Per-step rewards for process supervision (DeepSeekMath, arXiv 2402.03300, section 4.1.3), as pure functions.

Rewards score steps by character offsets into the decoded completion (`rewards.base.Step`); the policy loss
needs token positions. The driver merges the rewards' steps of each completion (`merge_steps`), maps their
character ends to token ends (`step_token_ends`), and pads them into the tensors `process_advantages` takes
(`step_tensors`):

    merged = merge_steps(steps_of_i, weights, values_of_i, len(text_i))            # [(score, char end)]
    ends = step_token_ends(decoded_prefix_lengths(token_ids_i, tokenizer, text_i), [end for _, end in merged])
    step_rewards, step_mask, step_ends = step_tensors(per_completion, group_size)  # [P, G, S] each
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from rewards.base import Step


def decoded_prefix_lengths(token_ids: list[int], tokenizer: Any, text: str) -> list[int]:
    """L[k] = len(decode(token_ids[:k])) for k = 0..T, the decode being the one that made `text` (special tokens
    skipped), in one streaming pass: tokenizers' `DecodeStream` yields each token's new characters once they
    are whole (a byte-level token holding part of a UTF-8 character adds its character with the token that
    completes it). O(T). Where the stream does not reproduce `text` (a slow tokenizer, one that cleans up
    tokenization spaces), each prefix is decoded instead, O(T^2) characters.

    Args:
        token_ids: the completion's T token ids.
        tokenizer: a transformers tokenizer.
        text: `tokenizer.decode(token_ids, skip_special_tokens=True)`, as the rewards saw it.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        from tokenizers.decoders import DecodeStream

        stream, lengths = DecodeStream(skip_special_tokens=True), [0]
        for token in token_ids:
            lengths.append(lengths[-1] + len(stream.step(backend, token) or ""))
        if lengths[-1] == len(text):
            return lengths
    return [len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)) for k in range(len(token_ids) + 1)]


def step_token_ends(prefix_lengths: list[int], char_ends: list[int]) -> list[int]:
    """The token end of each step, from the decoded length L[k] of every prefix of the T tokens:

        k(c) = T                           if c >= L[T]  (the step reaches the end of the text)
               min {k : L[k] >= c}         otherwise

    so the step's last character lies in token k - 1 and [.., k) is its half-open token range, the
    `step_ends` of `process_advantages`. A step that reaches the end of the text takes the tokens after it
    that decode to nothing (EOS): stopping is credited to the last step, and a completion that is only EOS
    has its one step on that token. A token holding characters of two steps goes to the first.
    O(S log T) by bisection.

    Args:
        prefix_lengths: L[0..T] (`decoded_prefix_lengths`), non-decreasing.
        char_ends: S exclusive character ends into the decoded text.

    Returns:
        S token ends in [0, T].
    """
    total = len(prefix_lengths) - 1
    return [total if end >= prefix_lengths[-1] else bisect.bisect_left(prefix_lengths, end) for end in char_ends]


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
