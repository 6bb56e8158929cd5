"""The sampling distribution one way for engines and learner (rollout/sampling.py): top-k then top-p as vLLM
applies them, the learner's rule for a sampled token below its own cut-off, entropy, and chunking."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from rollout import sampling
from rollout.sampling import filter_logits, nucleus_cutoff, sampled_logprobs

PROBS = torch.tensor([[0.4, 0.3, 0.2, 0.1]])


def kept(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> list[list[bool]]:
    return filter_logits(logits, top_k, top_p).isfinite().tolist()


def test_top_p_keeps_the_smallest_nucleus_and_top_k_comes_first():
    logits = PROBS.log()
    assert kept(logits, top_p=0.5) == [[True, True, False, False]]  # mass before: 0, 0.4 < 0.5, 0.7
    assert kept(logits, top_p=0.7) == [[True, True, False, False]]  # 0.7 is not < 0.7
    assert kept(logits, top_k=3) == [[True, True, True, False]]
    # top-k first, then top-p over the renormalised rest: [4/7, 3/7], and 4/7 >= 0.5 already
    assert kept(logits, top_k=2, top_p=0.5) == [[True, False, False, False]]
    assert kept(logits) == [[True] * 4] and kept(logits, top_k=4) == [[True] * 4]
    tied = torch.tensor([[1.0, 0.5, 0.5, 0.0]])
    assert kept(tied, top_k=2) == [[True, True, True, False]]  # ties of the k-th are kept, as in vLLM


def test_ties_of_the_k_th_value_stay_in_the_top_p_mass():
    """Logits 3, 2, 2, 2, 1 (bf16 logits tie often): top-k 2 keeps 3 and all three 2s; top-p 0.75 is then
    taken over those four renormalised, e^3 / (e^3 + 3 e^2) = 0.475, + e^2 / (...) = 0.650 < 0.75: three kept
    (the first two tied ones: not a threshold on value here, see test_the_kept_set_is_vllms)."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert kept(logits, top_k=2) == [[True, True, True, True, False]]
    # with the mass renormalised over the 2 largest only (e^3 / (e^3 + e^2) = 0.73 < 0.75) the cut-off would be
    # below the 2s as well; over all four tied it falls at the 2s: every tied token is kept by the threshold
    assert kept(logits, top_k=2, top_p=0.75) == [[True, True, True, True, False]]
    assert nucleus_cutoff(logits, 2, 0.4).item() == 3.0  # 0.475 >= 0.4: the largest alone


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_the_kept_set_is_vllms():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=generator) * 3
    for top_k, top_p in ((20, None), (None, 0.9), (20, 0.9), (5, 0.3)):
        k = torch.full((64,), top_k) if top_k else None
        p = torch.full((64,), top_p) if top_p else None
        theirs = apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True).isfinite()
        ours = filter_logits(logits, top_k or 0, top_p or 1.0).isfinite()
        assert torch.equal(ours, theirs), (top_k, top_p)
    # bf16-rounded logits tie at the k-th value often: the ties are kept and renormalised over, as vLLM does
    # (ties AT the top-p cut-off vLLM breaks by sort position, a threshold keeps them all: top-k only here)
    rounded = logits.bfloat16().float()
    k = torch.full((64,), 20)
    theirs = apply_top_k_top_p_pytorch(rounded.clone(), k, None, allow_cpu_sync=True).isfinite()
    assert torch.equal(filter_logits(rounded, 20).isfinite(), theirs)
    assert (theirs.sum(-1) > 20).any(), "no ties at the k-th value: the case is not exercised"


def test_cutoffs_found_in_chunks_equal_one_pass(monkeypatch):
    logits = torch.randn(37, 50, generator=torch.Generator().manual_seed(1))
    whole = nucleus_cutoff(logits, 10, 0.8)
    monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", 120)  # 2 rows per chunk
    assert torch.equal(nucleus_cutoff(logits, 10, 0.8), whole)
    assert torch.equal(nucleus_cutoff(logits.view(37, 1, 50), 10, 0.8), whole.view(37, 1))


def test_learner_logprobs_inside_the_nucleus_are_the_engines():
    logits = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(2))
    scaled = logits / 0.7
    engine = F.log_softmax(filter_logits(scaled, 20, 0.9), -1)  # what an engine samples from at each position
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), engine[:, :-1].argmax(-1)], dim=1)  # tokens it kept
    out = sampled_logprobs(logits, ids, temperature=0.7, top_k=20, top_p=0.9, entropy=True)
    expected = engine[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.logp[:, 1:], expected)
    assert not out.outside.any() and (out.logp[:, 0] == 0).all()
    probs = engine[:, :-1].exp()
    entropy = -(probs * engine[:, :-1].clamp(min=-1e30)).nansum(-1)
    torch.testing.assert_close(out.entropy[:, 1:], entropy)
    plain = sampled_logprobs(logits, ids, temperature=0.7)  # no filter: log softmax(z / T)
    torch.testing.assert_close(plain.logp[:, 1:], F.log_softmax(scaled[:, :-1], -1).gather(
        -1, ids[:, 1:, None]).squeeze(-1))


def test_a_sampled_token_below_the_cut_off_extends_the_kept_set_down_to_it():
    """Probabilities [0.4, 0.3, 0.2, 0.1], top_p 0.5 keeps tokens 0 and 1; a sampled token 3 extends the set to
    every token at or above it, i.e. all four: log 0.1 with no renormalisation, counted as outside. Its
    gradient reaches every kept logit (softmax over all four); token 2 sampled keeps 0-2: log(0.2 / 0.9)."""
    # position 1 predicts token 2 (positions 0 and 2: uniform, unfiltered at top_p 0.5 would keep 2 of 4)
    logits = torch.cat([torch.zeros(1, 1, 4), PROBS.log()[:, None], torch.zeros(1, 1, 4)], dim=1).requires_grad_()
    for token, expected, reached in ((3, math.log(0.1), 4), (2, math.log(0.2 / 0.9), 3), (1, math.log(0.3 / 0.7), 2)):
        ids = torch.tensor([[0, 0, token]])
        out = sampled_logprobs(logits, ids, top_p=0.5)
        assert out.logp[0, 2].item() == pytest.approx(expected, abs=1e-6)
        assert out.outside[0].tolist() == [False, False, token > 1]
        logits.grad = None
        out.logp[0, 2].backward()
        assert int((logits.grad[0, 1] != 0).sum()) == reached
