"""Runs that lose nothing: kill -9 at any moment (even mid-checkpoint), Ctrl-C, dead workers. Every case
runs the real `align` command in its own process (real Ray actors, DeepSpeed learners, torch engine) and
compares the per-step record with an uninterrupted run of the same recipe: the learning metrics to
floating-point tolerance and the sampled prompts, completions and rewards exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from align import checkpoint
from tests.conftest import ROOT, TINY_RECIPE
from tests.helpers.processes import (
    assert_same_run,
    descendants,
    finish,
    launch,
    logged_steps,
    records,
    run,
    survivors,
    wait_until,
)

pytestmark = pytest.mark.slow
GRPO_RECIPE = ROOT / "recipes" / "grpo-tiny.yaml"
# A fresh tiny MoE, one learner, one torch engine, one reward worker; 6 overlapped steps, a checkpoint every 2.
GRPO = [str(GRPO_RECIPE), "model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny",
        "rewards=[{name: 'tests.helpers.rewards:digit_fraction'}]", "data.heldout=null", "algorithm.steps=6",
        "algorithm.prompts_per_step=4", "algorithm.group_size=4", "train.micro_batch_size=8",
        "rollout.max_new_tokens=16", "cluster.num_workers=1", "output.save_every=2", "train.lr=1e-2",
        "algorithm.overlap_rollout=true"]


def workers(run_dir: Path) -> dict[str, list[int]]:
    return json.loads((run_dir / "workers.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run to compare against, made once."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run("grpo", GRPO, run_dir)
    return run_dir


def test_grpo_killed_mid_checkpoint_then_stopped_by_ctrl_c_resumes_exactly(tmp_path, reference_run):
    """kill -9 while the step-4 checkpoint is being written, resume, Ctrl-C, resume: the same run as one
    never interrupted. Overlapped rollout: the checkpoint also holds the next step's batch, sampled before
    the last update."""
    run_dir = tmp_path / "run"
    process = launch("grpo", GRPO, run_dir)
    root = run_dir / "checkpoints"
    # kill -9 while its staging directory exists, not yet renamed into place
    wait_until(lambda: any(p.name.startswith(".tmp-step-00000004") for p in root.glob(".tmp-*")), process)
    process.kill()
    process.wait()
    assert [p.name for _, p in checkpoint.list_checkpoints(root)] == ["step-00000002"]
    assert list(root.glob(".tmp-step-00000004*")), "the kill did not land during the write"

    process = launch("grpo", [*GRPO, "--resume"], run_dir)
    log = tmp_path / "run.log"
    wait_until(lambda: "resumed at step 2" in log.read_text() and logged_steps(run_dir) >= 3, process)
    spawned = descendants(process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    code, output = finish(process, run_dir)
    assert code == 128 + signal.SIGINT, output[-3000:]
    assert "resumed at step 2" in output and not list(root.glob(".tmp-*"))
    stopped_at = logged_steps(run_dir)
    assert f"stopped on SIGINT after step {stopped_at}" in output and "--resume" in output
    assert checkpoint.latest_checkpoint(root).name == checkpoint.step_name(stopped_at)
    assert survivors(spawned, grace=30) == []  # Ray shut down, no actor or agent left behind

    output = run("grpo", [*GRPO, "--resume"], run_dir)
    assert f"resumed at step {stopped_at}" in output
    assert_same_run(run_dir, reference_run)


def test_grpo_survives_dead_rollout_and_reward_workers_and_stops_cleanly_on_a_dead_learner(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    process = launch("grpo", GRPO, run_dir)
    wait_until(lambda: logged_steps(run_dir) >= 1, process)
    os.kill(workers(run_dir)["rollout"][0], signal.SIGKILL)
    wait_until(lambda: logged_steps(run_dir) >= 2, process)
    reward_group = next(name for name in workers(run_dir) if name.startswith("reward-"))
    os.kill(workers(run_dir)[reward_group][0], signal.SIGKILL)
    wait_until(lambda: (run_dir / "checkpoints" / checkpoint.step_name(4)).is_dir(), process)
    os.kill(workers(run_dir)["grpo-learners"][0], signal.SIGKILL)
    code, output = finish(process, run_dir, timeout=300)
    assert code == 1, output[-3000:]
    assert "grpo-learners rank 0: worker died" in output and "latest checkpoint" in output
    metrics = records(run_dir, "metrics.jsonl")
    assert metrics[-1]["faults/engine_restarts"] >= 1 and metrics[-1]["faults/reward_restarts"] >= 1
    assert sum(r["reward_missing/total"] for r in metrics) == 0  # nothing lost to the dead workers

    output = run("grpo", [*GRPO, "--resume"], run_dir)
    assert "resumed at step 4" in output
    # redone with the same seeds and weights, the lost work came out as if nothing had happened
    assert_same_run(run_dir, reference_run)


def test_sft_skips_non_finite_updates_and_stops_after_three_in_a_row(tmp_path):
    """lr 1e30: the first update blows the weights up, every later loss is NaN. DeepSpeed skips those steps
    (weights, optimizer, lr schedule untouched); the third in a row stops the run with a checkpoint."""
    run_dir = tmp_path / "run"
    args = [str(TINY_RECIPE), "train.lr=1e30", "train.max_steps=10", "cluster.num_workers=1", "output.save_every=1",
            "output.keep_last=4"]
    code, output = finish(launch("sft", args, run_dir), run_dir)
    assert code == 1, output[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient" in output and "step-00000004" in output
    metrics = records(run_dir, "metrics.jsonl")
    assert [r["skipped_updates"] for r in metrics] == [0, 1, 1, 1]
    assert len({r["lr"] for r in metrics[1:]}) == 1  # the schedule did not advance on skipped steps
    first, last = (torch.load(run_dir / "checkpoints" / checkpoint.step_name(step) / "engine" /
                              "mp_rank_00_model_states.pt", weights_only=False)["module"] for step in (1, 4))
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
