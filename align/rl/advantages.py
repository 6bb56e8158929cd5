"""GRPO advantages and reward shaping, as pure functions on tensors.

A rollout batch holds P prompts with G sampled completions each (the "group"), laid out prompt-major:
completion i of prompt p is row p * G + i of every flat [P * G, ...] tensor, so `rewards.view(P, G)`
recovers the groups. Outcome supervision (one reward per completion) and process supervision (one reward
per reasoning step) follow DeepSeekMath (arXiv 2402.03300, section 4.1.2 and 4.1.3); the std scaling
options follow Dr. GRPO (arXiv 2503.20783, "none") and PPO Lite (arXiv 2508.08221, "batch"); dynamic
sampling and the soft overlong penalty follow DAPO (arXiv 2503.14476).

Std convention, the same as TRL 1.16's GRPOTrainer (`trl.trainer.utils.nanstd`): the unbiased sample std
(Bessel's correction, divide by n - 1), and eps = 1e-4 added to the std, not to the variance. A group of
one has no spread: its std is taken as 0, as TRL does.
"""

from typing import Literal

import torch

RewardScale = Literal["group", "batch", "none"]
TruncationMode = Literal["none", "mask", "penalty"]


def _std_or_zero(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std over `dim` (all elements if None); 0 where fewer than two values."""
    count = values.numel() if dim is None else values.shape[dim]
    if count < 2:
        mean = values.mean() if dim is None else values.mean(dim=dim, keepdim=keepdim)
        return torch.zeros_like(mean)
    return values.std() if dim is None else values.std(dim=dim, keepdim=keepdim)


def group_advantages(rewards: torch.Tensor, scale: RewardScale = "group", eps: float = 1e-4,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Outcome-supervision advantages, one per completion (every token of completion i gets A_i).

        A_pi = (r_pi - mean_j r_pj) / (std + eps)
        std  = std_j r_pj           scale="group"  (DeepSeekMath GRPO)
               std over all P*G r   scale="batch"  (PPO Lite)
        A_pi = r_pi - mean_j r_pj   scale="none"   (Dr. GRPO: no std division, no difficulty bias)

    The baseline is always the group's own mean; only the divisor changes. std is unbiased (n - 1).
    Completions without a valid reward (a reward call failed) take no part: means and stds run over the
    valid j only, and their own A is 0.

    Args:
        rewards: [P, G] scalar reward of each completion (any value where not valid, NaN included).
        scale: which std divides the centred rewards.
        eps: added to the std so that a group with equal rewards gets A = 0, not 0/0.
        valid: [P, G] bool, default all True.

    Returns:
        [P, G] advantages, same dtype as rewards.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    weight = valid.to(rewards.dtype)  # [P, G]
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = weight.sum(dim=1, keepdim=True)  # [P, 1]
    centred = (rewards - rewards.sum(dim=1, keepdim=True) / count.clamp(min=1)) * weight  # [P, G]
    if scale == "none":
        return centred
    if scale == "group":
        std = ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt() * (count > 1)  # [P, 1]
    else:
        values = rewards[valid]
        std = _std_or_zero(values) if values.numel() else rewards.new_zeros(())
    return centred / (std + eps)


def process_advantages(
    step_rewards: torch.Tensor,
    step_mask: torch.Tensor,
    step_ends: torch.Tensor,
    num_tokens: int,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Process-supervision advantages (DeepSeekMath 4.1.3): per-token sums of normalised step rewards.

    For group p, let R_p be the rewards of all valid steps of all G completions. Then

        r~_pis   = (r_pis - mean(R_p)) / (std(R_p) + eps)          std unbiased (n - 1), 0 if n < 2
        A_pi,t   = sum over valid steps s of completion i with end(s) > t  of  r~_pis

    i.e. token t collects the normalised rewards of its own step and of every later step ("the steps ending
    at or after t"). Steps are half-open token ranges [start, end) of the completion, so the last token of
    step s is end(s) - 1. Steps that end past T count for every token; tokens after the last step get 0.

    Computed in O(P*G*(S+T)): scatter each step's r~ onto its last token, then a reverse cumulative sum.

    Args:
        step_rewards: [P, G, S] reward of each step, S = the most steps of any completion (padded).
        step_mask: [P, G, S] bool, True for real steps.
        step_ends: [P, G, S] long, exclusive end token index of each step within the completion.
        num_tokens: T, the padded completion length of the output.
        eps: added to the group std.

    Returns:
        [P, G, T] per-token advantages.
    """
    if step_rewards.dim() != 3 or step_mask.shape != step_rewards.shape or step_ends.shape != step_rewards.shape:
        raise ValueError("step_rewards, step_mask and step_ends must all be [prompts, group_size, steps]")
    valid = step_mask.bool()
    weight = valid.to(step_rewards.dtype)
    count = weight.sum(dim=(1, 2), keepdim=True)  # [P, 1, 1]
    mean = (step_rewards * weight).sum(dim=(1, 2), keepdim=True) / count.clamp(min=1)
    sq_dev = ((step_rewards - mean) ** 2 * weight).sum(dim=(1, 2), keepdim=True)
    std = torch.where(count > 1, (sq_dev / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq_dev))
    normalised = torch.where(valid, (step_rewards - mean) / (std + eps), torch.zeros_like(step_rewards))

    # A step ending at or before token 0 covers no token; drop it rather than wrap around to index -1.
    last_token = (step_ends - 1).clamp(max=num_tokens - 1)  # [P, G, S]
    counted = valid & (last_token >= 0)
    at_last_token = step_rewards.new_zeros(*step_rewards.shape[:2], num_tokens)  # [P, G, T]
    at_last_token.scatter_add_(2, last_token.clamp(min=0), torch.where(counted, normalised, 0.0))
    return at_last_token.flip(2).cumsum(2).flip(2)  # A_t = sum_{t' >= t} at_last_token_t'


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: True where every reward of the group is exactly equal (max == min), so every A_pi = 0.
    NaN rewards (failed reward calls) are left out; a group with fewer than two others counts as equal.

    Such a group gives no policy gradient (only the KL term, if any): DAPO's dynamic sampling drops it.

    Args:
        rewards: [P, G].
    """
    valid = ~rewards.isnan()
    high = torch.where(valid, rewards, torch.full_like(rewards, float("-inf"))).amax(dim=1)
    low = torch.where(valid, rewards, torch.full_like(rewards, float("inf"))).amin(dim=1)
    return (high <= low) | (valid.sum(dim=1) < 2)


def select_informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Indices of the groups whose rewards are not all equal (std > 0), for DAPO dynamic sampling.

    The driver keeps these groups, samples more prompts, and repeats until it has a full batch:

        keep = select_informative_groups(rewards)   # rewards [P, G] -> keep [K] long, K <= P
        batch_rewards = rewards[keep]               # and the same rows of every [P, G, ...] tensor

    Args:
        rewards: [P, G].

    Returns:
        [K] long indices into the P groups, ascending.
    """
    return (~zero_std_groups(rewards)).nonzero().squeeze(1)


def handle_truncated(
    rewards: torch.Tensor,
    completion_mask: torch.Tensor,
    truncated: torch.Tensor,
    mode: TruncationMode,
    penalty: float = -1.0,
    add: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Treat completions cut off at the length limit (no end-of-sequence token).

        mode="none":     rewards and mask unchanged.
        mode="mask":     mask_i = 0 for truncated i, so they add nothing to the loss (nor to its token
                         counts); their rewards still enter the group baseline (TRL's
                         `mask_truncated_completions`, DAPO's overlong filtering).
        mode="penalty":  r_i = penalty (add=False) or r_i + penalty (add=True) for truncated i; apply before
                         the advantages so the penalty is normalised with the rest of the group.

    Args:
        rewards: [N] (N = P * G) rewards, or any shape matching truncated.
        completion_mask: [N, T] loss mask (bool or 0/1).
        truncated: [N] bool.
        mode: one of "none", "mask", "penalty".
        penalty: reward given to (or added to) a truncated completion in "penalty" mode.
        add: add the penalty to the reward instead of replacing it.

    Returns:
        (rewards [N], completion_mask [N, T]) as new tensors, same dtypes as the inputs.
    """
    truncated = truncated.bool()
    if mode == "none":
        return rewards.clone(), completion_mask.clone()
    if mode == "mask":
        kept = (~truncated).to(completion_mask.dtype).unsqueeze(-1)  # [N, 1]
        return rewards.clone(), completion_mask * kept
    if mode == "penalty":
        penalised = rewards + penalty if add else torch.full_like(rewards, penalty)
        return torch.where(truncated, penalised, rewards), completion_mask.clone()
    raise ValueError(f"mode must be 'none', 'mask' or 'penalty', got {mode!r}")


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the task reward.

        R(L) = 0                                   L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache   L_max - L_cache < L <= L_max
             = -1                                  L > L_max

    equivalently clamp(((L_max - L_cache) - L) / L_cache, -1, 0); L_cache = 0 leaves only the cliff at L_max
    (as TRL's `get_soft_overlong_punishment` does).

    Args:
        lengths: [N] completion lengths L in tokens.
        max_length: L_max.
        cache_length: L_cache in [0, L_max], the width of the linear ramp before L_max.

    Returns:
        [N] float32 penalties in [-1, 0].
    """
    if not 0 <= cache_length <= max_length:
        raise ValueError(f"need 0 <= cache_length <= max_length, got {cache_length=} {max_length=}")
    lengths = lengths.to(torch.float32)
    if cache_length == 0:
        return -(lengths > max_length).to(torch.float32)
    ramp = ((max_length - cache_length) - lengths) / cache_length
    return ramp.clamp(min=-1.0, max=0.0)
