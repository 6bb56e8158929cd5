"""GRPO policy losses, the k3 KL estimator and the truncated importance weight, as pure functions on tensors.

Notation: B completions (B = P * G rows), T padded completion tokens, `logp` [B, T] the learner's
log pi_theta(o_t | q, o_<t) with gradient, `old_logp` the same under pi_old = pi_prox (the learner's policy
before this batch's update, no gradient; the engine that sampled, pi_behav, enters only through the weight of
`truncated_is_weights`), `mask` [B, T] 1 on completion tokens that count. Log-probs are of the sampling
distribution, after temperature, top-k and top-p (rollout/sampling.py).

The objective to maximise (DeepSeekMath, arXiv 2402.03300, eq. 3), per token:

    r_t   = pi_theta / pi_old = exp(logp_t - old_logp_t)
    J_t   = min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t) - beta * KL_t

and the loss is -aggregate(J). Which aggregate, and the TRL 1.16 `loss_type` that computes the same:

    seq_mean_token_mean      1/N sum_i 1/|o_i| sum_t J_it      DeepSeekMath    TRL "grpo" (N = rows that count)
    token_mean               sum_i sum_t J_it / sum_i |o_i|    DAPO            TRL "dapo" or "bnpo"
    seq_mean_token_sum_norm  sum_i sum_t J_it / (B * L_max)    Dr. GRPO        TRL "dr_grpo"

Each aggregate is a sum over rows divided by a normaliser N (`loss_normaliser`) that the learners compute once
for the whole batch: TRL's "dapo" divides by the token count of the whole accumulated, all-process batch (our
`normaliser`), "bnpo" by the micro-batch's own (our `normaliser=None` on a micro-batch). Sequence-level
ratios (GSPO, arXiv 2507.18071) are TRL's `importance_sampling_level="sequence"`. The loss is the negative
objective, to minimise.
tests/test_trl_parity.py checks every one of these against TRL's own loss code.
"""

from collections.abc import Callable
from typing import Literal

import torch

Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
RatioLevel = Literal["token", "sequence"]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (Schulman 2020), unbiased and always >= 0.

        KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 = exp(ref_logp - logp) - (ref_logp - logp) - 1

    Args:
        logp: [B, T] log pi_theta, with gradient.
        ref_logp: [B, T] log pi_ref of the frozen reference.

    Returns:
        [B, T].
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def truncated_is_weights(learner_old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight of the behaviour policy (the engine that sampled), detached.

        w_t = min(pi_prox / pi_behav, C) = min(exp(learner_old_logp_t - rollout_logp_t), C)

    w_t multiplies the per-token surrogate (not the KL term). Two uses, one formula:
    - TIS: the engine samples from slightly different probabilities than the learner computes for the same
      weights. Equal to TRL's `vllm_importance_sampling_mode="token_truncate"` with
      `vllm_importance_sampling_clip_max=C`.
    - Decoupled PPO for stale samples (AReaL, arXiv 2505.24298; after Hilton et al., arXiv 2110.00641):
      the batch was sampled by weights several updates old, pi_behav; the clip is taken against the proximal
      policy pi_prox (the learner before this batch's update) and w_t corrects behaviour -> proximal, so
      clipping bounds the update and not the staleness.

        J_t = w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),   r_t = pi_theta / pi_prox

    Args:
        learner_old_logp: [B, T] log pi_prox as the learner computes it.
        rollout_logp: [B, T] log-probabilities the rollout engine returned with the samples.
        cap: C, the upper bound of the weight.

    Returns:
        [B, T] weights in [0, C], no gradient.
    """
    return torch.exp(learner_old_logp - rollout_logp).clamp(max=cap).detach()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_means(values: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    """sum_t m_t v_t / sum_t m_t of each [B, T] value (bool counts as 0/1), detached: {name: float}."""
    return {name: _masked_mean(value.detach().to(mask.dtype), mask).item() for name, value in values.items()}


def mismatch_metrics(learner_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     cap: float | None = None) -> dict[str, float]:
    """How far the engine that sampled (pi_behav) is from the learner's policy before the update (pi_prox), over
    the tokens that count, with d_t = learner_logp_t - rollout_logp_t:

        mismatch/logp_abs_mean  mean_t |d_t|
        mismatch/logp_abs_max   max_t |d_t|
        mismatch/kl_k3          mean_t exp(d_t) - d_t - 1, the k3 estimate of KL(pi_behav || pi_prox) from the
                                engine's own samples (prime-rl's mismatch KL)
        is_truncated            mean_t [exp(d_t) > C], the share of tokens whose behaviour weight the cap C cut
                                (0 without a cap: no weight is applied)

    Args:
        learner_logp, rollout_logp, mask: [B, T].
        cap: C of `truncated_is_weights`, or None.
    """
    mask = mask.to(learner_logp.dtype)
    d = (learner_logp - rollout_logp).detach() * mask
    truncated = (d.exp() > cap).to(mask.dtype) if cap is not None else torch.zeros_like(d)
    return {"mismatch/logp_abs_mean": _masked_mean(d.abs(), mask).item(),
            "mismatch/logp_abs_max": (d.abs() * mask).max().item() if d.numel() else 0.0,
            "mismatch/kl_k3": _masked_mean(torch.expm1(d) - d, mask).item(),  # expm1: no rounding below 0 at d ~ 0
            "is_truncated": _masked_mean(truncated, mask).item()}


def counted_rows(mask: torch.Tensor) -> int:
    """#{i : sum_t m_it > 0}: the rows of a [B, T] mask with at least one token that counts."""
    return int((mask.sum(-1) > 0).sum())


def loss_normaliser(
    mask: torch.Tensor, aggregation: Aggregation, max_completion_length: int | None = None
) -> float:
    """The denominator N of an aggregation, computed once over a WHOLE batch (every micro-batch of every learner):

        seq_mean_token_mean      N = #{i : sum_t m_it > 0}      the rows that count
        token_mean               N = sum_it m_it                 the tokens that count
        seq_mean_token_sum_norm  N = B * L_max                   every row (B = P * G, counted or not), fixed

    Each micro-batch's loss is then its rows' sum divided by this N (`policy_loss(..., normaliser=N)`), so the
    gradients summed over micro-batches and learners are exactly the gradient of one aggregate over the batch,
    however the rows that count are spread. Clamped to >= 1.

    Args:
        mask: [B, T], the whole batch's mask of tokens that count (rows masked out entirely count 0).
        aggregation: name in AGGREGATIONS.
        max_completion_length: L_max, required for "seq_mean_token_sum_norm".
    """
    if aggregation == "seq_mean_token_mean":
        count = float(counted_rows(mask))
    elif aggregation == "token_mean":
        count = float(mask.sum())
    elif aggregation == "seq_mean_token_sum_norm":
        if max_completion_length is None:
            raise ValueError("seq_mean_token_sum_norm needs max_completion_length (the constant denominator)")
        count = float(mask.shape[0] * max_completion_length)
    else:
        raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {aggregation!r}")
    return max(count, 1.0)


def seq_mean_token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """DeepSeekMath / TRL "grpo": mean over each sequence's tokens, then over the N sequences that count.

        L = 1/N sum_i ( sum_t m_it * l_it / max(sum_t m_it, 1) )

    TRL divides by every row B, counted or not; here a row with no counted token (masked out) is not a
    sequence of the mean, so masking a row changes no other row's weight.

    Args:
        per_token_loss: [B, T] (or [B, 1], broadcast over the mask).
        mask: [B, T] float.
        normaliser: N from `loss_normaliser` (of the whole batch when this is one micro-batch of it).
    """
    per_sequence = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_sequence.sum() / normaliser


def token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """DAPO: every token weighs the same, whatever the length of its sequence.

        L = sum_it m_it * l_it / N,   N = the tokens that count

    With N the count of the whole accumulated, all-learner batch this is TRL "dapo"; with the micro-batch's own
    count, TRL "bnpo".

    Args:
        per_token_loss: [B, T] (or [B, 1], broadcast over the mask).
        mask: [B, T] float.
        normaliser: N from `loss_normaliser`.
    """
    return (per_token_loss * mask).sum() / normaliser


def seq_mean_token_sum_norm(per_token_loss: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Dr. GRPO / TRL "dr_grpo": token sum over a constant denominator, so length carries no bias.

        L = sum_it m_it * l_it / N,   N = B * L_max (all P * G rows of the batch)

    Args:
        per_token_loss: [B, T] (or [B, 1], broadcast over the mask).
        mask: [B, T] float.
        normaliser: N from `loss_normaliser`.
    """
    return (per_token_loss * mask).sum() / normaliser


AggregationFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

AGGREGATIONS: dict[str, AggregationFn] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_ratio_weighted: bool = False,
    aggregation: Aggregation = "seq_mean_token_mean",
    ratio_level: RatioLevel = "token",
    max_completion_length: int | None = None,
    normaliser: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss with optional k3 KL penalty, clip-higher, GSPO ratios and TIS.

    Per token (token level):

        r_t = exp(logp_t - old_logp_t)
        l_t = -min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t) * w_t + beta * KL_t
        loss = AGGREGATIONS[aggregation](l, mask, N),   N = normaliser or loss_normaliser(mask, aggregation)

    w_t = is_weights (TIS or the decoupled objective's behaviour weight, no gradient; 1 if None),
    KL_t = kl_k3(logp, ref_logp), or KL_t * r_t * w_t when `kl_ratio_weighted` (DeepSeek-V3.2's unbiased KL
    gradient under off-policy samples: the samples come from pi_behav, so the weight is pi_theta / pi_behav =
    r_t * w_t, capped as w_t is; TRL's `use_bias_correction_kl`, on by default there, off in DeepSeekMath).
    With sequence-level ratios w_t stays per token (TRL's "token_truncate"); a per-sequence weight is not
    implemented.

    Sequence level (GSPO): one ratio per sequence from the length-normalised log-ratio,

        s_i = exp( sum_t m_it (logp_it - old_logp_it) / |o_i| )

    used in place of r_t for every token of sequence i (shape [B, 1], broadcast over T); the gradient flows
    through the mean, d s_i / d logp_it = s_i / |o_i| (as TRL 1.16 computes it, no stop-gradient). With
    "seq_mean_token_mean" and one advantage per sequence this is exactly GSPO's
    -1/B sum_i min(s_i A_i, clip(s_i) A_i).

    Masked tokens (mask 0) contribute neither value nor gradient; they must hold finite numbers.
    beta == 0 skips the KL term entirely, so ref_logp may be None.

    Args:
        logp: [B, T] learner log-probs of the sampled tokens, with gradient.
        old_logp: [B, T] log-probs under pi_old, no gradient (logp.detach() when on-policy, mu = 1).
        advantages: [B] (outcome supervision) or [B, T] (process supervision).
        mask: [B, T] bool or 0/1, the tokens that count.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]; eps_high defaults to eps_low
            (DAPO's clip-higher uses eps_high = 0.28 > eps_low = 0.2).
        beta: KL coefficient; 0 skips the reference model.
        ref_logp: [B, T] reference log-probs, required when beta != 0.
        kl_ratio_weighted: multiply KL_t by the (differentiable) ratio, see above.
        aggregation: name in AGGREGATIONS.
        ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO).
        max_completion_length: L_max for "seq_mean_token_sum_norm" (when `normaliser` is None).
        normaliser: the aggregation's denominator N, from `loss_normaliser` over the whole batch when these
            rows are one micro-batch of it; None computes it from this batch.
        is_weights: [B, T] or [B, 1] truncated IS weights from `truncated_is_weights`, or None.

    Returns:
        loss: scalar tensor to minimise.
        metrics: detached floats, named and computed as TRL logs them: "clip_ratio/low_mean" (fraction of
            tokens with r < 1 - eps_low and A < 0), "clip_ratio/high_mean" (r > 1 + eps_high and A > 0),
            "clip_ratio/region_mean" (either), "ratio_mean", and "kl" when beta != 0. Token-level values are
            means over masked tokens; sequence-level ratios are means over sequences.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {aggregation!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]

    log_ratio = logp - old_logp  # [B, T]
    if ratio_level == "token":
        log_weight = log_ratio
    elif ratio_level == "sequence":
        log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(1)  # [B, 1]
    else:
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = torch.exp(log_weight)  # [B, T] or [B, 1]
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights

    metrics: dict[str, float] = {}
    if beta != 0.0:
        per_token_kl = kl_k3(logp, ref_logp)  # [B, T]
        if kl_ratio_weighted:  # pi_theta / pi_behav: the ratio to pi_old, times the behaviour weight
            per_token_kl = per_token_kl * ratio * (is_weights if is_weights is not None else 1.0)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask).item()

    if normaliser is None:
        normaliser = loss_normaliser(mask, aggregation, max_completion_length)
    loss = AGGREGATIONS[aggregation](per_token_loss, mask, normaliser)

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0)).to(logp.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).to(logp.dtype)
        metrics["clip_ratio/low_mean"] = _logged_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _logged_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _logged_mean(torch.maximum(low, high), mask)
        metrics["ratio_mean"] = _logged_mean(ratio, mask)
    return loss, metrics


def _logged_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over counted tokens of a [B, T] value; a [B, 1] value is one per sequence: mean over sequences (TRL)."""
    return (values.mean() if values.shape[1] == 1 else _masked_mean(values, mask)).item()
