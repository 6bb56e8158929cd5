"""Every benchmark and the fault-injection script in scripts/ run as documented, in a smoke mode: a couple of
steps each, so that a command the README gives cannot rot unnoticed. These assert that each runs to the end
and reports what it says it reports, not its figures (those are measured on a quiet machine: README,
docs/benchmarks.md). Each is one command line, as a user would type it, with fewer steps. The fault-injection
script's smoke run is in tests/test_reliability.py, beside the uninterrupted run it compares with, and
scripts/bench_sandbox.py's in tests/test_sandbox.py, which must not run beside it (it counts the sandbox uid's
processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.processes import script

pytestmark = pytest.mark.slow


def test_bench_grpo_runs_align_and_trl_and_reports_the_ratio(ray_cluster, tmp_path):
    out = tmp_path / "bench_grpo.json"
    stdout = script("bench_grpo.py", "--steps", "2", "--warmup", "1", "--out", str(out), ray_address=ray_cluster)
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"align", "trl"} and report["settings"]["zero_stage"] == 2
    for side in report["results"].values():
        assert side["steps_measured"] == 1 and side["completions_per_s"] > 0 and side["phases_s"]
    assert report["ratios"]["completions_per_s"] > 0 and "align / TRL =" in stdout
    assert report["results"]["trl"]["prompt_check"].startswith("TRL prompt tokens == align's")


def test_bench_sft_runs_every_mode_and_checks_the_labels(ray_cluster, tmp_path):
    out = tmp_path / "bench_sft.json"
    modes = ["align", "trl-packed", "trl-unpacked", "trl-wrapped"]  # the README's command
    script("bench_sft.py", "--steps", "3", "--warmup", "1", "--modes", ",".join(modes), "--out", str(out),
           ray_address=ray_cluster)
    report = json.loads(out.read_text())
    assert list(report["results"]) == modes and set(report["ratios"]) == {f"align/{m}" for m in modes[1:]}
    assert all(r["tokens_per_s"] > 0 for r in report["results"].values())
    assert all("label_check" in report["results"][m] for m in modes[1:])


def test_bench_sft_memory_measures_every_role_at_each_size(tmp_path):
    """Its own Ray (no ray_address): it measures the whole process tree of each run."""
    out = tmp_path / "bench_sft_memory.json"
    script("bench_sft_memory.py", "--rows", "1000", "--steps", "4", "--out", str(out))  # one size: one run
    report = json.loads(out.read_text())
    runs = report["results"]
    assert [r["rows"] for r in runs] == [1000] and all(r["steps"] == 4 for r in runs)
    assert all(r["rss_mib"]["total"] > r["rss_mib"]["learner"] > 0 and r["learner_processes"] == 1 for r in runs)
    assert set(report["ratio_largest_over_smallest"]) >= {"rss driver", "rss learner", "rss total"}


def test_staleness_table_runs_each_k_and_seed_and_tabulates_them(ray_cluster, tmp_path):
    """Two 3-step runs (k = 2, seeds 0 and 1) of a fresh tiny MoE on 20 held-out problems, joining the shared Ray."""
    out = tmp_path / "staleness"
    stdout = script("staleness_table.py", "--steps", "3", "--k", "2", "--seeds", "0", "1", "--out", str(out), "--",
                    "model.path=null", "model.preset=deepseek-v2-tiny", "model.tokenizer=data/tokenizer-tiny",
                    "rewards=[{name: 'tests.helpers.rewards:digit_fraction'}]", "data.heldout_limit=20",
                    "algorithm.prompts_per_step=4", "train.micro_batch_size=16",
                    "rollout.max_new_tokens=16", ray_address=ray_cluster)
    report = json.loads((out / "table.json").read_text())
    runs = report["results"]["2"]
    assert set(runs) == {"0", "1"} and all(r["steps"] == 3 and 0 <= r["staleness"] <= 2 for r in runs.values())
    assert all(r["mean abs logp gap"] >= 0 for r in runs.values())
    assert "| 2 |" in stdout and (out / "table.md").read_text().count("\n") == 3


def test_gpu_check_stages_run_on_the_cpu(tmp_path):
    script("gpu_check.py", "--cpu", "--stages", "tiny", "--out", str(tmp_path))
    stages = json.loads((Path(tmp_path) / "gpu_check.json").read_text())["stages"]
    assert set(stages) == {"tiny/sft", "tiny/grpo"} and not any("error" in stage for stage in stages.values()), stages
