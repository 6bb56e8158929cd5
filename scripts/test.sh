#!/usr/bin/env bash
# Set up the project venv (if needed) and run the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"
