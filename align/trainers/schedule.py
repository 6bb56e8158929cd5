"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based).

    warm-up (step < W):   (step + 1) / W
    after, with progress p = (step - W) / max(1, total - W), clamped to [0, 1]:
        cosine:   m + (1 - m) * (1 + cos(pi * p)) / 2
        linear:   m + (1 - m) * (1 - p)
        constant: 1
    where m = min_ratio.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r}")
