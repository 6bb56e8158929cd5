"""The total reward of each sample from the recipe's weighted rewards (pure function)."""

from __future__ import annotations

import torch


def combine_rewards(values: dict[str, list[float | None]], weights: dict[str, float], fallback: float | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """r_i = sum_k c_k R_k(i)  (DeepSeek-V2 stage 2: c1 R_helpful + c2 R_safety + c3 R_rule).

    A sample missing any R_k (its reward call failed) gets r_i = `fallback`, or, with no fallback, is
    invalid: r_i = NaN and valid_i = False (kept out of the loss and of its group's statistics).

    Args:
        values: reward name -> [N] values, None where missing.
        weights: reward name -> c_k.
        fallback: reward for samples with a missing value, or None.

    Returns:
        (total [N] float32, valid [N] bool).
    """
    names = list(values)
    count = len(values[names[0]]) if names else 0
    total = torch.zeros(count)
    missing = torch.zeros(count, dtype=torch.bool)
    for name in names:
        column = torch.tensor([float("nan") if v is None else v for v in values[name]], dtype=torch.float32)
        missing |= column.isnan()
        total += weights[name] * torch.nan_to_num(column)
    if fallback is not None:
        return torch.where(missing, torch.full_like(total, fallback), total), torch.ones(count, dtype=torch.bool)
    return torch.where(missing, torch.full_like(total, float("nan")), total), ~missing
