"""Greedy completions of a checkpoint from vLLM, with transformers teacher-forced along them, saved with torch.save.

Run as its own process (vLLM owns the process while it runs):
    python tests/helpers/vllm_greedy.py MODEL_DIR OUT.pt PROMPT [PROMPT ...]

OUT.pt holds per prompt: `tokens` (vLLM's greedy tokens), `logprobs` (the log-probs vLLM reports for them)
`reference_logp` ([tokens, vocab]: transformers' log softmax along the same tokens, from the same files), and
`eos`, `max_tokens`, `finished` (vLLM stopped at a stop token), for `tests.helpers.greedy`'s two checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    model_dir, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.cpu_kernels import follow_aten_cpu_capability
    from tests.helpers.greedy import teacher_forced_logp

    follow_aten_cpu_capability()  # before vLLM loads its kernels
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    dtype = os.environ.get("ALIGN_CHECK_DTYPE", "float32")
    # The CPU rotary custom op mishandles DeepSeek-V2's 3-D q/k (ENVIRONMENT.md): use the native one.
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=512,
              compilation_config={"custom_ops": ["-rotary_embedding"]}, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0)
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    results = []
    for prompt_ids, output in zip(ids, outputs):
        tokens = list(output.token_ids)
        results.append({"tokens": tokens, "eos": tokenizer.eos_token_id, "max_tokens": params.max_tokens,
                        "finished": output.finish_reason == "stop",
                        "logprobs": [step[token].logprob for step, token in zip(output.logprobs, tokens)],
                        "reference_logp": teacher_forced_logp(model, prompt_ids, tokens)})
    torch.save(results, out)


if __name__ == "__main__":
    main()
