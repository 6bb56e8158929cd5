"""Memory planning on the meta device: the 236B and 15.7B presets are planned, never materialised."""

from __future__ import annotations

import subprocess
import sys

import pytest

from align.models.plan import zero_memory
from tests.conftest import ROOT

GIB = 1024**3


@pytest.mark.parametrize(("stage", "expected_gib"), [
    # P = T = 1 GiB-worth of parameters (2**30), N = 4, bf16: w = g = 2 bytes, o = 12 bytes
    (0, 2 + 2 + 12),          # everything replicated
    (1, 2 + 2 + 12 / 4),      # optimizer partitioned
    (2, 2 + (2 + 12) / 4),    # gradients and optimizer partitioned
    (3, (2 + 2 + 12) / 4),    # all partitioned
])
def test_zero_memory_matches_the_zero_paper(stage, expected_gib):
    plan = zero_memory(GIB, GIB, workers=4, zero_stage=stage, precision="bf16", offload_optimizer=False)
    assert plan.device_gib == pytest.approx(expected_gib)


def test_offload_moves_optimizer_states_to_the_host():
    plan = zero_memory(GIB, GIB, workers=2, zero_stage=2, precision="fp32", offload_optimizer=True)
    assert plan.optimizer_gib == 0 and plan.offloaded_gib == pytest.approx(8 / 2)
    assert plan.device_gib == pytest.approx(4 + 4 / 2)


def test_plan_of_the_full_deepseek_v2_runs_anywhere():
    result = subprocess.run(
        [sys.executable, "-m", "align.cli", "sft", "recipes/sft-deepseek-v2-lite.yaml", "--plan", "model.path=null",
         "model.preset=deepseek-v2", "cluster.num_workers=128"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "235.74B parameters, 20.85B active per token" in result.stdout
    # 235.74e9 * (2 + 2 + 12) bytes / 128 learners
    assert f"{235.741e9 * 16 / 128 / GIB:.1f} GiB before activations" in result.stdout


def test_plan_of_a_checkpoint_not_on_this_machine_is_one_line_naming_model_path(capsys):
    from align.cli import main

    assert main(["sft", "recipes/sft-deepseek-v2-lite.yaml", "--plan"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["align: error: recipes/sft-deepseek-v2-lite.yaml: model.path: /checkpoints/DeepSeek-V2-Lite is "
                     "not a model directory (no config.json); to plan it without the checkpoint, name a preset of its "
                     "shape: model.path=null model.preset=<deepseek-v2|deepseek-v2-lite|deepseek-v2-tiny|llama-tiny>"]
