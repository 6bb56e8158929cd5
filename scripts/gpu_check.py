"""GPU check: the SFT and GRPO learners and the torch rollout engine on one CUDA device in bf16.

Runs the same plain Python objects the Ray actors host (no Ray: the GPU image has none), over NCCL with a
world of one, on two models built from presets:
  tiny  the demo's DeepSeek-V2 MoE (0.98M params): correctness (after a weight sync the engine's greedy
        completions equal the learner's own) and a full GRPO step;
  mid   DeepSeek-V2-Lite shapes (hidden 2048, MLA, 2 shared + 64 routed experts, top-6) cut to 3 layers,
        1.25B params (249M active per token), with the 1024-id tiny vocabulary: throughput.
Each stage writes its figures to OUT/gpu_check.json as soon as it ends, so a stage that fails or a run
cut short still leaves the others.

    python scripts/gpu_check.py --out DIR [--stages tiny,mid]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from align.config.checks import load_grpo_recipe, load_sft_recipe  # noqa: E402
from align.data.prompts import load_prompts  # noqa: E402
from align.trainers.grpo_learner import GRPOLearner  # noqa: E402
from align.trainers.rollout_batch import rollout_tensors, split_shards  # noqa: E402
from align.trainers.sft_learner import SFTLearner  # noqa: E402
from rollout.torch_engine import SamplingConfig, TorchEngine  # noqa: E402

# --cpu: the same stages on this machine in fp32 over gloo, shrunk, to debug the script before device time.
DEVICE = "cpu" if "--cpu" in sys.argv else "cuda"
BF16 = ["model.dtype=bfloat16", "deepspeed.precision=bf16", "cluster.backend=nccl", "cluster.num_workers=1",
        "cluster.threads_per_worker=8"] if DEVICE == "cuda" else ["cluster.backend=gloo", "cluster.num_workers=1"]
MODELS = {
    "tiny": ["model.preset=deepseek-v2-tiny"],
    "mid": ["model.preset=deepseek-v2-lite", "model.preset_overrides={num_hidden_layers: 3}"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synced() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def release() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def sft_stage(model: str, port: int, steps: int, max_length: int, micro: int) -> dict:
    recipe = load_sft_recipe(ROOT / "recipes/sft-tiny.yaml", [
        *BF16, *MODELS[model], "model.tokenizer=data/tokenizer-tiny", f"data.max_length={max_length}",
        f"train.micro_batch_size={micro}", "train.grad_accum=1", f"train.max_steps={steps + 2}", "train.lr=1e-4"])
    learner = SFTLearner(recipe, 0, 1, "127.0.0.1", port, steps + 2)
    info = learner.info()
    losses = [learner.train_step()["loss"] for _ in range(2)]  # warm-up: kernels, allocator
    started, tokens = synced(), 0
    for _ in range(steps):
        metrics = learner.train_step()
        tokens += metrics["tokens"]
        losses.append(metrics["loss"])
    seconds = synced() - started
    result = {"parameters": info["parameters"], "rows_per_step": micro, "tokens_per_row": max_length,
              "steps": steps, "s_per_step": seconds / steps, "tokens_per_s": tokens / seconds,
              "loss_first": losses[0], "loss_last": losses[-1],
              "peak_gib": peak_gib()}
    del learner
    release()
    return result


def grpo_stage(model: str, port: int, steps: int, prompts_per_step: int, group: int, max_new: int,
               check_sync: bool) -> dict:
    rows = prompts_per_step * group
    recipe = load_grpo_recipe(ROOT / "recipes/grpo-tiny.yaml", [
        *BF16, "model.path=null", *MODELS[model], "model.tokenizer=data/tokenizer-tiny",
        f"algorithm.prompts_per_step={prompts_per_step}", f"algorithm.group_size={group}",
        f"train.micro_batch_size={min(rows, 32)}", f"rollout.max_new_tokens={max_new}", "train.lr=1e-5"])
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    learner = GRPOLearner(recipe, 0, 1, "127.0.0.1", port)
    tokenizer = learner.tokenizer
    from align.models.loading import build_model

    engine = TorchEngine(build_model(recipe.model, tokenizer).to(DEVICE), tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    prompts = load_prompts(recipe.data.train, tokenizer, recipe.data.prompt_key, recipe.data.answer_key,
                           recipe.data.max_prompt_length, limit=prompts_per_step * (steps + 1))
    result: dict = {"parameters": learner.engine.module.num_parameters(), "prompts_per_step": prompts_per_step,
                    "group_size": group, "max_new_tokens": max_new, "steps": steps}
    started = synced()
    engine.update_weights(learner.policy_state())
    result["sync_s"] = synced() - started
    if check_sync:
        probe = [p.token_ids for p in prompts[:8]]
        result["greedy_engine_equals_learner"] = \
            [c.token_ids for c in engine.generate(probe, SamplingConfig(max_new_tokens=24, temperature=0))] \
            == learner.greedy(probe, 24)
    timings: dict[str, list[float]] = {"generate_s": [], "update_s": [], "sync_s": []}
    completions_total = tokens_total = 0
    for step in range(steps + 1):  # step 0 warms up
        batch = prompts[step * prompts_per_step:(step + 1) * prompts_per_step]
        t0 = synced()
        completions = engine.generate([p.token_ids for p in batch],
                                      SamplingConfig(n=group, max_new_tokens=max_new, temperature=1.0, seed=step))
        t1 = synced()
        input_ids, mask, rollout_logp = rollout_tensors(batch, completions, tokenizer.pad_token_id)
        rewards = torch.randn(rows)  # throughput only: the advantage values do not change the work
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        shard = split_shards(input_ids, mask, rollout_logp, advantages, 1, recipe.algorithm.aggregation, max_new)[0]
        metrics = learner.update(shard)
        t2 = synced()
        engine.update_weights(learner.policy_state())
        t3 = synced()
        if step:
            timings["generate_s"].append(t1 - t0)
            timings["update_s"].append(t2 - t1)
            timings["sync_s"].append(t3 - t2)
            completions_total += len(completions)
            tokens_total += sum(len(c.token_ids) for c in completions)
        result["kl_last"] = metrics.get("kl")
    total = sum(sum(v) for v in timings.values())
    result.update({k: sum(v) / len(v) for k, v in timings.items()})
    result.update(s_per_step=total / steps, completions_per_s=completions_total / total,
                  generated_tokens_per_s=tokens_total / sum(timings["generate_s"]),
                  mean_completion_tokens=tokens_total / completions_total,
                  peak_gib=peak_gib())
    del learner, engine
    release()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--stages", default="tiny,mid")
    parser.add_argument("--cpu", action="store_true", help="smoke-test the stages on CPU (fp32, gloo, short)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", DEVICE)
    import transformers

    device_name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": device_name,
                    "torch": torch.__version__, "transformers": transformers.__version__, "stages": {}}
    port = free_port()
    short = DEVICE == "cpu"
    plan = {
        "tiny": [("sft", lambda: sft_stage("tiny", port, 3 if short else 20, 256, 8)),
                 ("grpo", lambda: grpo_stage("tiny", port, 2 if short else 5, 16, 8, 64, check_sync=True))],
        "mid": [("sft", lambda: sft_stage("mid", port, 1 if short else 8, 128 if short else 1024, 8)),
                ("grpo", lambda: grpo_stage("mid", port, 1 if short else 3, 8, 8, 8 if short else 128,
                                            check_sync=False))],
    }
    for model in args.stages.split(","):
        for kind, stage in plan[model]:
            name = f"{model}/{kind}"
            started = time.perf_counter()
            try:
                report["stages"][name] = stage()
            except Exception:  # noqa: BLE001 - one failed stage must not lose the others' figures
                report["stages"][name] = {"error": traceback.format_exc()[-3000:]}
                release()
            report["stages"][name]["wall_s"] = time.perf_counter() - started
            print(name, json.dumps(report["stages"][name]), flush=True)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
