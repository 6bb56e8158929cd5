"""The pieces that end or resume a run, in one process: signal handling, the non-finite guard, generator
states, metric truncation after a kill, and the run directory rules."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from align import checkpoint
from align.trainers.learner_group import truncate_metrics
from align.trainers.run_control import NonFiniteUpdates, RunControl, RunInterrupted


def test_non_finite_steps_stop_the_run_only_when_in_a_row():
    control = RunControl("align test", max_nonfinite_in_row=3)
    saved: list[int] = []

    def save(step: int) -> str:
        saved.append(step)
        return f"ckpt/step-{step:08d}"

    returned = [control.after_step(step, skipped, 0, save) for step, skipped in enumerate([1, 1, 0, 1, 1], start=1)]
    assert returned == [None] * 5 and saved == []  # no checkpoint due, no stop
    assert control.guard.total == 4 and control.guard.in_row == 2
    with pytest.raises(NonFiniteUpdates) as stopped:
        control.after_step(6, 1, 0, save)
    assert saved == [6] and "3 steps in a row" in str(stopped.value) and "step-00000006" in str(stopped.value)


def test_first_signal_asks_for_a_checkpoint_second_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with RunControl("align test", 3) as control:
        assert control.after_step(3, 0, 3, lambda step: f"ckpt/step-{step:08d}") == "ckpt/step-00000003"
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(RunInterrupted) as stopped:
            control.after_step(4, 0, 3, lambda step: f"ckpt/step-{step:08d}")
        assert stopped.value.exit_code == 128 + signal.SIGTERM
        assert "stopped on SIGTERM after step 4; checkpoint: ckpt/step-00000004" in str(stopped.value)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_generator_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_metrics_after_the_checkpoint_and_a_line_cut_by_a_kill_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_run_directory_is_never_reused_by_accident(tmp_path):
    run_dir = tmp_path / "run"
    checkpoint.prepare_run_dir(run_dir, resume=False, overwrite=False)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints" / ".tmp-step-00000002-123").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pass --resume to continue it or output.overwrite=true"):
        checkpoint.prepare_run_dir(run_dir, resume=False, overwrite=False)
    checkpoint.prepare_run_dir(run_dir, resume=True, overwrite=False)  # keeps the run, drops the half-written save
    assert (run_dir / "metrics.jsonl").exists() and not list((run_dir / "checkpoints").iterdir())
    checkpoint.prepare_run_dir(run_dir, resume=False, overwrite=True)
    assert not (run_dir / "metrics.jsonl").exists()
