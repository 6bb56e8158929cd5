"""Greedy completions of a checkpoint from vLLM and from transformers, printed as JSON.

Run as its own process (vLLM owns the process while it runs):
    python tests/helpers/vllm_greedy.py MODEL_DIR PROMPT [PROMPT ...]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main() -> None:
    model_dir, prompts = sys.argv[1], sys.argv[2:]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    dtype = os.environ.get("ALIGN_CHECK_DTYPE", "float32")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    hf = []
    for prompt_ids in ids:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        hf.append(out[0, len(prompt_ids):].tolist())

    # The CPU rotary custom op mishandles DeepSeek-V2's 3-D q/k (ENVIRONMENT.md): use the native one.
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=512,
              compilation_config={"custom_ops": ["-rotary_embedding"]}, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    vllm = [list(o.outputs[0].token_ids) for o in outputs]
    print("RESULT " + json.dumps({"hf": hf, "vllm": vllm}))


if __name__ == "__main__":
    main()
