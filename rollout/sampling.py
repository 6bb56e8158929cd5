"""The distribution a rollout samples from, computed one way by the engines and the learner.

    pi_s(x | h) = softmax(z / T over K(h))[x]

z are the logits at prefix h, T the temperature, K(h) the tokens kept: the `top_k` largest of z / T (0: all;
ties of the k-th are kept), then of those the smallest set, by descending probability renormalised over them,
whose mass reaches `top_p` (a token is kept when the mass ranked strictly above it is < top_p). This is vLLM's
order and rule (`apply_top_k_top_p`: top-k first, then top-p over the renormalised rest), and it is what both
engines report as a sampled token's log-prob (vLLM `logprobs_mode="processed_logprobs"`). K(h) is a threshold
on z / T: every token at or above the cut-off c(h) is kept. Ties of the k-th value are kept and count in the
top-p mass, as in vLLM; tokens tied exactly AT the top-p cut-off vLLM keeps or drops by their sort position,
a threshold keeps them all (with bf16 logits this moves a log-prob by the tied tokens' share of the mass).
vLLM on GPU runs a Triton kernel for the same rule; only its PyTorch path (the CPU one) is tested against.

The learner recomputes pi_s on its own logits, where the cut-off can fall just above a token the engine
sampled (the engine's numerics differ, or its weights are older). Rule: the learner's kept set is extended
down to the sampled token, c'(h) = min(c(h), z_x / T), the smallest descending prefix that holds it (the
engine's set was such a prefix too). The token then has a finite log-prob and a gradient; such tokens are
counted (`outside`) and logged every step as `mismatch/outside_nucleus`.

Memory: the cut-offs are found in chunks of about CHUNK_ELEMENTS logits (a sort of the vocabulary per position
for top-p; top-k alone needs only `topk`), so a 1,536-position micro-batch of DeepSeek-V2's 102,400-token
vocabulary sorts 64 M floats at a time (0.8 GB with the indices) instead of 157 M at once (1.9 GB); the entropy
is summed in the same chunks. What stays for backward is the log-softmax output (fp32, 0.63 GB at that size) and
the filter's bool mask (0.16 GB); a chunked autograd function that recomputes them would save those (not built).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**26


def filters(top_k: int, top_p: float, vocab: int) -> bool:
    """Whether (top_k, top_p) restricts a distribution over `vocab` tokens at all."""
    return 0 < top_k < vocab or top_p < 1.0


@torch.no_grad()
def nucleus_cutoff(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """c(h): the smallest kept value of z / T at each position (see the module docstring).

    Args:
        scaled: [..., V] temperature-scaled logits.
        top_k: keep the k largest (0: no top-k).
        top_p: nucleus mass over the top-k (1: no top-p).

    Returns:
        [...] cut-offs, -inf where nothing is filtered.
    """
    flat = scaled.reshape(-1, scaled.shape[-1])
    vocab = flat.shape[-1]
    k = top_k if 0 < top_k < vocab else 0
    if not filters(k, top_p, vocab):
        return torch.full(scaled.shape[:-1], float("-inf"), dtype=scaled.dtype, device=scaled.device)
    rows = max(1, CHUNK_ELEMENTS // vocab)
    cutoffs = []
    for chunk in flat.split(rows):
        if top_p >= 1.0:  # top-k alone: the k-th largest (its ties kept)
            cutoffs.append(chunk.topk(k, dim=-1).values[:, -1])
            continue
        ranked = chunk.sort(dim=-1, descending=True).values
        if k:  # top-k first, its ties kept (vLLM masks values below the k-th), then top-p over what is left
            ranked = ranked.masked_fill(ranked < ranked[:, k - 1:k], float("-inf"))
        probs = ranked.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        cutoffs.append(ranked.gather(-1, kept - 1).squeeze(-1))
    return torch.cat(cutoffs).reshape(scaled.shape[:-1])


def filter_logits(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """z / T with every token outside K(h) set to -inf: log_softmax of it is log pi_s. [..., V] -> [..., V]."""
    if not filters(top_k, top_p, scaled.shape[-1]):
        return scaled
    return scaled.masked_fill(scaled < nucleus_cutoff(scaled, top_k, top_p)[..., None], float("-inf"))


@dataclass
class SampledLogprobs:
    logp: torch.Tensor  # [B, L] log pi_s(x_t | x_<t), position 0: 0
    outside: torch.Tensor  # [B, L] bool, x_t lay below this model's own cut-off (kept by the rule above)
    entropy: torch.Tensor | None  # [B, L] entropy of pi_s at each position (no gradient), position 0: 0


def sampled_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, entropy: bool = False) -> SampledLogprobs:
    """log pi_s of each token of `input_ids` given the ones before it, as the engine that sampled it computed:
    logits [B, L, V] (position t predicts token t + 1) -> [B, L] aligned with `input_ids`. The kept set of each
    position is extended down to its token (module docstring); the gradient flows through the kept logits.
    `entropy`: also H(pi_s) = -sum_x pi_s(x) log pi_s(x) per position, detached."""
    scaled = logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:, None]
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    outside = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if filters(top_k, top_p, scaled.shape[-1]):
        cutoff = nucleus_cutoff(scaled.detach(), top_k, top_p)
        target_value = scaled.detach().gather(-1, targets).squeeze(-1)
        outside[:, 1:] = target_value < cutoff
        scaled = scaled.masked_fill(scaled < torch.minimum(cutoff, target_value)[..., None], float("-inf"))
    log_probs = F.log_softmax(scaled, dim=-1)
    logp[:, 1:] = log_probs.gather(-1, targets).squeeze(-1)
    entropies = None
    if entropy:  # in chunks of positions: two fp32 temporaries of CHUNK_ELEMENTS, not of [B, L, V]
        with torch.no_grad():
            entropies = torch.zeros_like(logp)
            flat = log_probs.detach().reshape(-1, log_probs.shape[-1])
            rows = max(1, CHUNK_ELEMENTS // flat.shape[-1])
            entropies[:, 1:] = torch.cat([torch.special.entr(chunk.exp()).sum(-1)
                                          for chunk in flat.split(rows)]).view(log_probs.shape[:-1])
    return SampledLogprobs(logp, outside, entropies)
