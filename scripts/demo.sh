#!/usr/bin/env bash
# Set up the project venv (if needed) and run the demo pipeline on this CPU machine:
#   1. SFT of the tiny DeepSeek-V2 MoE with 2 DeepSpeed learners under Ray, then held-out accuracy of
#      the untrained and the fine-tuned model on the same problems;
#   2. GRPO from the SFT checkpoint (2 learners + 1 torch rollout engine, 200 steps with dynamic sampling),
#      held-out accuracy before/after. About 20 minutes in all once the venv exists on an AVX-512 CPU, 32 on an AVX2-only one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
align=.venv/bin/align
$align sft recipes/sft-tiny.yaml output.dir=runs/demo-sft output.overwrite=true
echo "== held-out accuracy, untrained model (same architecture, random weights) =="
$align eval deepseek-v2-tiny --tokenizer data/tokenizer-tiny --limit 200
echo "== held-out accuracy, after align sft =="
$align eval runs/demo-sft/final --limit 200
echo "== GRPO from the SFT model =="
$align grpo recipes/grpo-tiny.yaml model.path=runs/demo-sft/final output.dir=runs/demo-grpo output.overwrite=true "$@"
