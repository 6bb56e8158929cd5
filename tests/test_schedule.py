"""Learning-rate schedules against hand-computed values."""

from __future__ import annotations

import pytest

from align.trainers.schedule import lr_factor


@pytest.mark.parametrize(("step", "schedule", "expected"), [
    (0, "cosine", 0.25),            # warm-up: (0 + 1) / 4
    (3, "cosine", 1.0),             # last warm-up step
    (4, "cosine", 1.0),             # progress 0: cos(0) = 1
    (9, "cosine", 0.1 + 0.9 * 0.5), # progress (9 - 4) / 10 = 0.5: cos(pi / 2) = 0
    (14, "cosine", 0.1),            # progress 1
    (99, "cosine", 0.1),            # past the end: clamped
    (9, "linear", 0.1 + 0.9 * 0.5),
    (11, "linear", 0.1 + 0.9 * 0.3),
    (11, "constant", 1.0),
])
def test_lr_factor(step, schedule, expected):
    assert lr_factor(step, warmup_steps=4, total_steps=14, schedule=schedule, min_ratio=0.1) == pytest.approx(expected)
