"""Runs that lose nothing: kill -9 at any moment (even mid-checkpoint), Ctrl-C, dead workers. Every case
runs the real `align` command in its own process (real Ray actors, DeepSpeed learners, torch engine) and
compares the per-step record with an uninterrupted run of the same recipe: the learning metrics to
floating-point tolerance and the sampled prompts, completions and rewards exactly. (tests/test_sft_ray.py
kills and resumes `align sft`; scripts/fault_inject.py kills at random, smoke-run in tests/test_scripts.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
# A fresh tiny MoE, one learner, one torch engine, one reward worker; 8 steps sampled up to 2 batches ahead, a
# checkpoint every 2.
GRPO = [str(GRPO_RECIPE), "model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny",
        "rewards=[{name: 'tests.helpers.rewards:digit_fraction'}]", "data.heldout=null", "algorithm.steps=8",
        "algorithm.prompts_per_step=4", "algorithm.group_size=4", "train.micro_batch_size=8",
        "rollout.max_new_tokens=16", "cluster.num_workers=1", "output.save_every=2", "train.lr=1e-2",
        "algorithm.max_staleness=2"]


def workers(run_dir: Path) -> dict[str, list[int]]:
    return json.loads((run_dir / "workers.json").read_text())


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory):
    """The uninterrupted run to compare against, made once (on the shared Ray: nothing is killed in it)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run("grpo", [*GRPO, f"cluster.ray_address={ray_cluster}"], run_dir)
    return run_dir


def test_grpo_through_every_kind_of_fault_resumes_exactly(tmp_path, reference_run):
    """One run taken through every fault, each launch on a Ray of its own as a user's would be, then compared
    with the run never interrupted: the same per-step record and the same samples. Overlapped rollout, so a
    checkpoint also holds the next step's batch, sampled before the last update.
    1. A rollout engine and a reward worker are killed: align replaces them and redoes their share.
    2. The driver is killed (kill -9) while the step-4 checkpoint is being written: step 2's stays whole.
    3. Resumed from it, the learner is killed once step 4's checkpoint exists: the run stops (exit 1), naming
       the worker and the checkpoint to resume from.
    4. Resumed from that, it is stopped by Ctrl-C: a checkpoint, exit 130, no process of the run left.
    5. Resumed to the end."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    root = run_dir / "checkpoints"
    process = launch("grpo", GRPO, run_dir)
    wait_until(lambda: logged_steps(run_dir) >= 1, process)
    os.kill(workers(run_dir)["rollout"][0], signal.SIGKILL)
    wait_until(lambda: logged_steps(run_dir) >= 2, process)
    reward_group = next(name for name in workers(run_dir) if name.startswith("reward-"))
    os.kill(workers(run_dir)[reward_group][0], signal.SIGKILL)
    # kill -9 while step 4's staging directory exists, not yet renamed into place
    wait_until(lambda: any(p.name.startswith(".tmp-step-00000004") for p in root.glob(".tmp-*")), process)
    process.kill()
    process.wait()
    assert [p.name for _, p in checkpoint.list_checkpoints(root)] == ["step-00000002"]
    assert list(root.glob(".tmp-step-00000004*")), "the kill did not land during the write"
    metrics = records(run_dir, "metrics.jsonl")
    assert metrics[-1]["faults/engine_restarts"] >= 1 and metrics[-1]["faults/reward_restarts"] >= 1
    assert sum(r["reward_missing/total"] for r in metrics) == 0  # nothing lost to the dead workers

    process = launch("grpo", [*GRPO, "--resume"], run_dir)
    # workers.json is this launch's once its step-4 checkpoint exists
    wait_until(lambda: "resumed at step 2" in log.read_text() and (root / checkpoint.step_name(4)).is_dir(), process)
    os.kill(workers(run_dir)["grpo-learners"][0], signal.SIGKILL)
    code, output = finish(process, run_dir, timeout=300)
    assert code == 1, output[-3000:]
    assert "grpo-learners rank 0: worker died" in output and "latest checkpoint" in output
    assert not list(root.glob(".tmp-*")), "the leftover staging directory was not removed"

    process = launch("grpo", [*GRPO, "--resume"], run_dir)
    wait_until(lambda: "resumed at step 4" in log.read_text() and logged_steps(run_dir) >= 5, process)
    spawned = descendants(process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    code, output = finish(process, run_dir)
    assert code == 128 + signal.SIGINT, output[-3000:]
    stopped_at = logged_steps(run_dir)
    assert f"stopped on SIGINT after step {stopped_at}" in output and "--resume" in output and stopped_at < 8
    assert checkpoint.latest_checkpoint(root).name == checkpoint.step_name(stopped_at)
    assert survivors(spawned, grace=30) == []  # Ray shut down, no actor or agent left behind

    output = run("grpo", [*GRPO, "--resume"], run_dir)
    assert f"resumed at step {stopped_at}" in output
    # redone with the same seeds and weights, the lost work came out as if nothing had happened
    assert_same_run(run_dir, reference_run)


def test_fault_injection_script_kills_loses_nothing_and_matches_the_uninterrupted_run(ray_cluster, reference_run,
                                                                                      tmp_path):
    """scripts/fault_inject.py in a smoke run on this module's recipe, compared with its reference run: the kill
    it makes (a rollout engine or a reward worker, which align replaces itself), then its own checks. Its
    `align` runs join the shared Ray (RAY_ADDRESS): these kills need no Ray of their own."""
    out = tmp_path / "fault_inject"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_cluster}
    result = subprocess.run([sys.executable, "scripts/fault_inject.py", "--kills", "1", "--steps", "8", "--targets",
                             "rollout,reward", "--reference", str(reference_run), "--out", str(out), "--", *GRPO[1:]],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert sum(report["kills"].values()) == 1 and report["steps_completed"] == 8, report
    assert report["samples_lost"] == 0 and report["same_as_uninterrupted"] and report["final_checkpoint_resumes"]
    assert "samples lost: 0 of" in result.stdout


def test_sft_skips_non_finite_updates_and_stops_after_three_in_a_row(ray_cluster, tmp_path):
    """lr 1e30: the first update blows the weights up, every later loss is NaN. DeepSpeed skips those steps
    (weights, optimizer, lr schedule untouched); the third in a row stops the run with a checkpoint."""
    run_dir = tmp_path / "run"
    args = [str(TINY_RECIPE), "train.lr=1e30", "train.max_steps=10", "cluster.num_workers=1", "output.save_every=1",
            "output.keep_last=4", f"cluster.ray_address={ray_cluster}"]
    code, output = finish(launch("sft", args, run_dir), run_dir)
    assert code == 1, output[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient" in output and "step-00000004" in output
    metrics = records(run_dir, "metrics.jsonl")
    assert [r["skipped_updates"] for r in metrics] == [0, 1, 1, 1]
    assert len({r["lr"] for r in metrics[1:]}) == 1  # the schedule did not advance on skipped steps
    first, last = (torch.load(run_dir / "checkpoints" / checkpoint.step_name(step) / "engine" /
                              "mp_rank_00_model_states.pt", weights_only=False)["module"] for step in (1, 4))
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
