"""Checking a greedy decode against a reference model computed by other kernels (vLLM against transformers,
bf16, a padded batch against one row alone, AVX-512 against AVX2).

Two implementations whose log-probabilities agree to within `tol` can still pick different tokens where the
reference's two best candidates are within `tol` of each other (a near-tie): an exact-argmax assertion then
fails on one CPU and passes on another without either being wrong. So the reference is teacher-forced along
the engine's own tokens and, at every position,
- the engine's pick is the reference's argmax unless the reference ranks it at most `tol` below its best
  (so wherever the reference's top-2 margin exceeds `tol`, the pick must be exactly the argmax), and
- the log-prob the engine reports for its pick equals the reference's to within `tol`;
and the decode stopped where it should (`assert_stopped`): at its first end-of-sequence token or at the token
limit. (An exact comparison of two token lists checked both at once.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_forced_logp(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log softmax of the logits that predicted each of `tokens` after `prompt`: [len(tokens), vocab], fp32."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens]), use_cache=False).logits[0].float()
    return F.log_softmax(logits[len(prompt) - 1:-1], dim=-1)


def assert_greedy_path(tokens: list[int], reference_logp: torch.Tensor, tol: float,
                       engine_logprobs: list[float] | None = None) -> int:
    """Assert the module docstring's two conditions for one greedy completion; returns the number of
    near-tie positions where the engine picked a token other than the reference's argmax.

    tokens: [T] the engine's greedy tokens; reference_logp: [T, vocab] from `teacher_forced_logp`;
    engine_logprobs: [T] the engine's reported log-probs of `tokens` (None: not checked)."""
    assert len(tokens) == reference_logp.shape[0] > 0
    picked = reference_logp[torch.arange(len(tokens)), torch.tensor(tokens)]  # [T]
    top2 = reference_logp.topk(2, dim=-1).values  # [T, 2]
    below_best = top2[:, 0] - picked  # [T], 0 where the pick is the argmax
    for position in (below_best > tol).nonzero().flatten().tolist():
        raise AssertionError(
            f"position {position}: the engine picked token {tokens[position]} at log-prob {picked[position]:.5f}, "
            f"{below_best[position]:.5f} below the reference's best {top2[position, 0]:.5f} (top-2 margin "
            f"{top2[position, 0] - top2[position, 1]:.5f}, tolerance {tol}): not a near-tie")
    if engine_logprobs is not None:
        torch.testing.assert_close(torch.tensor(engine_logprobs, dtype=torch.float32), picked, rtol=0, atol=tol)
    return int((below_best > 0).sum())


def assert_stopped(tokens: list[int], eos: int, max_new: int, finished: bool | None = None) -> None:
    """The decode ended at its first `eos` or, with none, after exactly `max_new` tokens; `finished` (the engine's
    own flag, when given) says which."""
    assert len(tokens) <= max_new, f"{len(tokens)} tokens, over the limit of {max_new}"
    assert eos not in tokens[:-1], f"generation went on after end-of-sequence at {tokens.index(eos)}: {tokens}"
    ended = bool(tokens) and tokens[-1] == eos
    assert ended or len(tokens) == max_new, f"stopped after {len(tokens)} of {max_new} tokens without eos: {tokens}"
    if finished is not None:
        assert finished == ended, f"finished={finished} but the last token is {tokens[-1:]} (eos {eos})"
