"""GRPO advantages and losses against hand-computed values (arithmetic in the comments)."""

import math

import pytest
import torch

from align.rl.advantages import (
    group_advantages,
    handle_truncated,
    overlong_penalty,
    process_advantages,
    select_informative_groups,
    zero_std_groups,
)
from align.rl.losses import (
    AGGREGATIONS,
    kl_k3,
    loss_normaliser,
    mismatch_metrics,
    policy_loss,
    truncated_is_weights,
)

EPS = 1e-4


def close(actual: torch.Tensor | float, expected: torch.Tensor | list | float) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- advantages

# P = 2 prompts, G = 3 samples each.
REWARDS = torch.tensor([[0.0, 1.0, 2.0], [4.0, 4.0, 7.0]])


def test_group_advantages_group_std() -> None:
    # group 0: mean 1, centred [-1, 0, 1], unbiased var (1 + 0 + 1) / 2 = 1, std 1
    # group 1: mean 5, centred [-1, -1, 2], var (1 + 1 + 4) / 2 = 3, std sqrt(3) = 1.7320508
    k = 1 / (math.sqrt(3) + EPS)
    close(group_advantages(REWARDS, "group"), [[-1 / 1.0001, 0.0, 1 / 1.0001], [-k, -k, 2 * k]])


def test_group_advantages_batch_std() -> None:
    # all six rewards 0 1 2 4 4 7: mean 3, deviations -3 -2 -1 1 1 4, squares sum 9+4+1+1+1+16 = 32,
    # unbiased var 32 / 5 = 6.4, std 2.5298221; the baseline stays each group's own mean
    std = math.sqrt(6.4)
    adv = group_advantages(REWARDS, "batch")
    close(adv, torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]) / (std + EPS))


def test_group_advantages_none_is_centred_only() -> None:
    close(group_advantages(REWARDS, "none"), [[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]])


def test_group_advantages_equal_rewards_and_single_sample_give_zero() -> None:
    # std 0: A = 0 / (0 + eps) = 0, not NaN; a group of one has std 0 (TRL's convention)
    close(group_advantages(torch.tensor([[3.0, 3.0, 3.0]]), "group"), [[0.0, 0.0, 0.0]])
    close(group_advantages(torch.tensor([[5.0], [1.0]]), "group"), [[0.0], [0.0]])
    with pytest.raises(ValueError):
        group_advantages(REWARDS, "max")  # type: ignore[arg-type]


def test_process_advantages_by_hand() -> None:
    # P = 2, G = 2, S = 2 steps, T = 4 tokens. Steps are [start, end) token ranges.
    step_rewards = torch.tensor([[[3.0, 0.0], [0.0, 9.0]], [[1.0, 1.0], [0.0, 9.0]]])
    step_mask = torch.tensor([[[True, True], [True, False]], [[True, True], [True, False]]])
    step_ends = torch.tensor([[[2, 4], [3, 0]], [[1, 6], [4, 0]]])
    # group 0: valid rewards 3, 0, 0: mean 1, var (4 + 1 + 1) / 2 = 3, std sqrt(3); k = 1 / (sqrt(3) + eps)
    #   normalised: 2k, -k, -k.  c0: steps end 2 (tokens 0-1) and 4 (tokens 2-3):
    #   A = [2k - k, 2k - k, -k, -k] = [k, k, -k, -k];   c1: one step ending at 3: A = [-k, -k, -k, 0]
    k = 1 / (math.sqrt(3) + EPS)
    # group 1: valid rewards 1, 1, 0: mean 2/3, var (1/9 + 1/9 + 4/9) / 2 = 1/3, std 0.57735;
    #   m = (1/3) / (std + eps): normalised m, m, -2m.  c0: steps end 1 and 6 (past T, so every token):
    #   A = [2m, m, m, m];   c1: one step ending at 4: A = [-2m] * 4
    m = (1 / 3) / (math.sqrt(1 / 3) + EPS)
    adv = process_advantages(step_rewards, step_mask, step_ends, num_tokens=4)
    close(adv, [[[k, k, -k, -k], [-k, -k, -k, 0.0]], [[2 * m, m, m, m], [-2 * m] * 4]])


def test_process_advantages_match_a_loop_over_steps() -> None:
    generator = torch.Generator().manual_seed(0)
    prompts, group, steps, tokens = 3, 4, 5, 12
    step_rewards = torch.randn(prompts, group, steps, generator=generator)
    step_mask = torch.rand(prompts, group, steps, generator=generator) > 0.3
    step_ends = torch.randint(0, tokens + 3, (prompts, group, steps), generator=generator)
    adv = process_advantages(step_rewards, step_mask, step_ends, num_tokens=tokens)
    expected = torch.zeros(prompts, group, tokens)
    for p in range(prompts):
        valid = step_rewards[p][step_mask[p]]
        normalised = (step_rewards[p] - valid.mean()) / (valid.std() + EPS)
        for i in range(group):
            for s in range(steps):
                if step_mask[p, i, s]:
                    for t in range(tokens):
                        if step_ends[p, i, s] > t:
                            expected[p, i, t] += normalised[i, s]
    close(adv, expected)


def test_zero_std_groups_and_selection() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert zero_std_groups(rewards).tolist() == [True, False, True, False]
    assert select_informative_groups(rewards).tolist() == [1, 3]


def test_handle_truncated_modes() -> None:
    rewards = torch.tensor([1.0, 0.5, 0.0])
    mask = torch.ones(3, 2, dtype=torch.long)
    truncated = torch.tensor([False, True, False])
    same_rewards, same_mask = handle_truncated(rewards, mask, truncated, "none")
    close(same_rewards, rewards)
    assert same_mask.tolist() == mask.tolist()
    masked_rewards, masked = handle_truncated(rewards, mask, truncated, "mask")
    close(masked_rewards, rewards)  # still in the group baseline
    assert masked.tolist() == [[1, 1], [0, 0], [1, 1]] and masked.dtype == torch.long
    replaced, kept_mask = handle_truncated(rewards, mask, truncated, "penalty", penalty=-1.0)
    close(replaced, [1.0, -1.0, 0.0])
    assert kept_mask.tolist() == mask.tolist()
    added, _ = handle_truncated(rewards, mask, truncated, "penalty", penalty=-1.0, add=True)
    close(added, [1.0, 0.5 - 1.0, 0.0])


def test_overlong_penalty() -> None:
    # L_max 10, L_cache 4: ramp (10 - 4 - L) / 4 = (6 - L) / 4, clamped to [-1, 0]
    # L = 3 -> 0 (0.75 clamped); 6 -> 0; 7 -> -0.25; 8 -> -0.5; 10 -> -1; 12 -> -1 (-1.5 clamped)
    close(overlong_penalty(torch.tensor([3, 6, 7, 8, 10, 12]), 10, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    # L_cache 0: no ramp, -1 only past L_max
    close(overlong_penalty(torch.tensor([3, 10, 11]), 10, 0), [0.0, 0.0, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([3]), 10, 11)


# -------------------------------------------------------------------------------------------------- losses


def test_kl_k3_value_and_gradient() -> None:
    # pi = 0.5, pi_ref = 0.25: ref - logp = log 0.5; KL = 0.5 - log 0.5 - 1 = 0.1931472
    # d KL / d logp = -exp(ref - logp) + 1 = 0.5;   pi == pi_ref: KL = 0, gradient 0
    logp = torch.tensor([math.log(0.5), math.log(0.3)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    kl = kl_k3(logp, ref)
    close(kl, [0.5 - math.log(0.5) - 1, 0.0])
    kl.sum().backward()
    close(logp.grad, [0.5, 0.0])


def test_truncated_is_weights() -> None:
    # exp(log 0.5 - log 0.25) = 2 -> capped at 1.5;  exp(log 0.9 - log 0.9) = 1;  exp(log .2 - log .4) = .5
    learner = torch.tensor([math.log(0.5), math.log(0.9), math.log(0.2)], requires_grad=True)
    rollout = torch.tensor([math.log(0.25), math.log(0.9), math.log(0.4)])
    weights = truncated_is_weights(learner, rollout, cap=1.5)
    close(weights, [1.5, 1.0, 0.5])
    assert not weights.requires_grad


# The decoupled objective on one stale sequence of 3 tokens: the engine that sampled (pi_behav), the learner
# before the update (pi_prox) and the policy being updated (pi_theta), written as probabilities.
BEHAV, PROX, THETA = [0.5, 0.2, 0.4], [0.6, 0.5, 0.4], [0.9, 0.5, 0.3]


def test_decoupled_objective_by_hand() -> None:
    """AReaL's decoupled PPO: clip pi_theta / pi_prox, weigh by min(pi_prox / pi_behav, C), C = 2.

        w = min([1.2, 2.5, 1.0], 2)     = [1.2, 2, 1]          r = theta / prox = [1.5, 1, 0.75]
        A = +1: min(r, clip(r, .8, 1.2)) = [1.2 (clipped), 1, 0.75];  J = w * . = [1.44, 2, 0.75]
        loss = -(1.44 + 2 + 0.75) / 3 = -1.396667
        d loss / d logp_t = -w_t r_t / 3 where unclipped: [0, -2/3, -0.25]
    The clip bounds the step away from pi_prox only: measured against pi_behav, r would be [1.8, 2.5, 0.75]
    and the first two tokens clipped, their staleness taken for an oversized update."""
    behav, prox = torch.tensor(BEHAV).log()[None], torch.tensor(PROX).log()[None]
    logp = torch.tensor(THETA).log()[None].requires_grad_()
    mask = torch.ones(1, 3)
    weights = truncated_is_weights(prox, behav, cap=2.0)
    close(weights, [[1.2, 2.0, 1.0]])
    loss, metrics = policy_loss(logp, prox, torch.tensor([1.0]), mask, is_weights=weights)
    close(loss, -(1.44 + 2.0 + 0.75) / 3)
    loss.backward()
    close(logp.grad, [[0.0, -2 / 3, -0.25]])
    close(metrics["clip_ratio/high_mean"], 1 / 3)
    # A = -1: min(-r, -clip(r)) = [-1.5, -1, -0.8 (clipped)]; J = w * . = [-1.8, -2, -0.8]; grads w r / 3 unclipped
    logp.grad = None
    loss, _ = policy_loss(logp, prox, torch.tensor([-1.0]), mask, is_weights=weights)
    close(loss, (1.8 + 2.0 + 0.8) / 3)
    loss.backward()
    close(logp.grad, [[1.2 * 1.5 / 3, 2 / 3, 0.0]])


def test_ratio_weighted_kl_uses_the_behaviour_ratio() -> None:
    """Samples come from pi_behav, so DeepSeek-V3.2's unbiased KL weight is pi_theta / pi_behav = r * w:
    with A = 0 and beta 1 the loss is mean_t r_t w_t KL_t."""
    behav, prox = torch.tensor(BEHAV).log()[None], torch.tensor(PROX).log()[None]
    logp = torch.tensor(THETA).log()[None]
    ref = torch.tensor([[0.5, 0.5, 0.5]]).log()
    weights = truncated_is_weights(prox, behav, cap=2.0)
    loss, _ = policy_loss(logp, prox, torch.tensor([0.0]), torch.ones(1, 3), beta=1.0, ref_logp=ref,
                          kl_ratio_weighted=True, is_weights=weights)
    expected = (torch.tensor(THETA) / torch.tensor(PROX)) * weights[0] * kl_k3(logp, ref)[0]
    close(loss, expected.mean())


def test_mismatch_metrics_by_hand() -> None:
    """d = log prox - log behav = [log 1.2, log 2.5, 0] (a fourth, masked token differs by 5):
    |d| mean (0.182322 + 0.916291) / 3, max 0.916291; k3 = e^d - d - 1 = [0.017678, 0.583709, 0] -> mean;
    truncated at C = 2: one token of three (none without a cap)."""
    behav = torch.tensor([*BEHAV, 0.1]).log()[None]
    prox = torch.cat([torch.tensor(PROX).log(), torch.tensor([5.0 + math.log(0.1)])])[None]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    metrics = mismatch_metrics(prox, behav, mask, cap=2.0)
    d = [math.log(1.2), math.log(2.5), 0.0]
    close(metrics["mismatch/logp_abs_mean"], sum(d) / 3)
    close(metrics["mismatch/logp_abs_max"], math.log(2.5))
    close(metrics["mismatch/kl_k3"], sum(math.exp(x) - x - 1 for x in d) / 3)
    close(metrics["is_truncated"], 1 / 3)
    assert mismatch_metrics(prox, behav, mask)["is_truncated"] == 0.0
    assert mismatch_metrics(prox, prox, mask) == {"mismatch/logp_abs_mean": 0.0, "mismatch/logp_abs_max": 0.0,
                                                  "mismatch/kl_k3": 0.0, "is_truncated": 0.0}


# B = 2 completions of one prompt (G = 2), T = 4. old_logp = 0, so the ratio r = exp(logp) is written directly.
RATIOS = torch.tensor([[1.0, 1.5, 0.5, 9.0], [1.1, 0.7, 5.0, 5.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # lengths 3 and 2
ADVANTAGES = torch.tensor([1.0, -1.0])
# eps 0.2, clip range [0.8, 1.2]; objective min(r A, clip(r) A) per counted token:
#   row 0 (A = +1): r 1 -> 1;  r 1.5 -> min(1.5, 1.2) = 1.2 (clipped);  r 0.5 -> min(0.5, 0.8) = 0.5
#   row 1 (A = -1): r 1.1 -> -1.1;  r 0.7 -> min(-0.7, -0.8) = -0.8 (clipped)
# per-token loss = -objective: row 0 [-1, -1.2, -0.5], row 1 [1.1, 0.8]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    logp = RATIOS.log().requires_grad_()
    return logp, torch.zeros_like(RATIOS)


def test_policy_loss_deepseekmath_value_gradient_and_metrics() -> None:
    logp, old = inputs()
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, aggregation="seq_mean_token_mean")
    # row means: -2.7 / 3 = -0.9 and 1.9 / 2 = 0.95; loss = (-0.9 + 0.95) / 2 = 0.025
    close(loss, 0.025)
    loss.backward()
    # unclipped tokens: d loss / d logp_t = -A r_t / |o_i| / B; clipped ones 0
    #   row 0: t0 -1 * 1 / 3 / 2 = -1/6, t1 clipped 0, t2 -0.5 / 3 / 2 = -1/12, t3 masked 0
    #   row 1: t0 +1.1 / 2 / 2 = 0.275, t1 clipped 0
    close(logp.grad, [[-1 / 6, 0.0, -1 / 12, 0.0], [0.275, 0.0, 0.0, 0.0]])
    # 5 counted tokens; low clip (r < 0.8, A < 0): row 1 t1; high clip (r > 1.2, A > 0): row 0 t1
    # (row 0 t2 has r 0.5 < 0.8 but A > 0: the clip does not bind, not counted); ratio mean 4.8 / 5
    assert metrics == pytest.approx(
        {"clip_ratio/low_mean": 0.2, "clip_ratio/high_mean": 0.2, "clip_ratio/region_mean": 0.4, "ratio_mean": 0.96}
    )


def test_policy_loss_token_mean_and_constant_denominator() -> None:
    logp, old = inputs()
    # DAPO: (-1 - 1.2 - 0.5 + 1.1 + 0.8) / 5 tokens = -0.16; with a 10-token global count: -0.08
    close(policy_loss(logp, old, ADVANTAGES, MASK, aggregation="token_mean")[0], -0.16)
    close(policy_loss(logp, old, ADVANTAGES, MASK, aggregation="token_mean", normaliser=10)[0], -0.08)
    # Dr. GRPO: -0.8 / (B * L_max) = -0.8 / (2 * 4) = -0.1
    loss, _ = policy_loss(logp, old, ADVANTAGES, MASK, aggregation="seq_mean_token_sum_norm", max_completion_length=4)
    close(loss, -0.1)
    loss.backward()
    # gradient -A r / (B * L_max) = -A r / 8 on unclipped tokens
    close(logp.grad, [[-1 / 8, 0.0, -0.5 / 8, 0.0], [1.1 / 8, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        policy_loss(logp, old, ADVANTAGES, MASK, aggregation="seq_mean_token_sum_norm")


def test_clip_higher_widens_only_the_upper_side() -> None:
    logp, old = inputs()
    # eps_high 0.6: range [0.8, 1.6]; row 0 t1 (r 1.5, A > 0) now unclipped: row 0 mean -(1 + 1.5 + 0.5) / 3 = -1;
    # row 1 t1 (r 0.7, A < 0) still clipped at 0.8; loss (-1 + 0.95) / 2 = -0.025
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, eps_low=0.2, eps_high=0.6)
    close(loss, -0.025)
    loss.backward()
    close(logp.grad[0, 1], -1.5 / 3 / 2)  # gradient flows through the high side now
    close(logp.grad[1, 1], 0.0)
    assert metrics["clip_ratio/high_mean"] == 0.0 and metrics["clip_ratio/low_mean"] == pytest.approx(0.2)
    # eps_low 0.4, eps_high 0.2: range [0.6, 1.2]; row 1 t1 now unclipped (-0.7), row 0 t1 still clipped
    # row 1 mean (1.1 + 0.7) / 2 = 0.9; loss (-0.9 + 0.9) / 2 = 0
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, eps_low=0.4, eps_high=0.2)
    close(loss, 0.0)
    assert metrics["clip_ratio/low_mean"] == 0.0 and metrics["clip_ratio/high_mean"] == pytest.approx(0.2)


def k3(r: float) -> float:
    # reference log-prob 0, logp = log r: KL = exp(-log r) + log r - 1 = 1/r + log r - 1
    return 1 / r + math.log(r) - 1


def test_kl_term_in_the_loss() -> None:
    logp, old = inputs()
    ref = torch.zeros_like(RATIOS)
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, beta=0.04, ref_logp=ref)
    # row KL means: (k3(1) + k3(1.5) + k3(0.5)) / 3 and (k3(1.1) + k3(0.7)) / 2; loss = 0.025 + 0.04 * their mean
    row0, row1 = (k3(1.0) + k3(1.5) + k3(0.5)) / 3, (k3(1.1) + k3(0.7)) / 2
    close(loss, 0.025 + 0.04 * (row0 + row1) / 2)
    # kl metric: token mean over the 5 counted tokens
    assert metrics["kl"] == pytest.approx((k3(1.0) + k3(1.5) + k3(0.5) + k3(1.1) + k3(0.7)) / 5)
    loss.backward()
    # KL gradient on a clipped token: beta * (1 - exp(ref - logp)) / |o_i| / B = 0.04 * (1 - 1/1.5) / 6
    close(logp.grad[0, 1], 0.04 * (1 - 1 / 1.5) / 6)
    # ratio-weighted KL (TRL's use_bias_correction_kl): KL_t * r_t, token mean for easy numbers
    weighted, _ = policy_loss(
        logp, old, ADVANTAGES, MASK, beta=1.0, ref_logp=ref, kl_ratio_weighted=True, aggregation="token_mean"
    )
    kl_times_r = k3(1.0) * 1 + k3(1.5) * 1.5 + k3(0.5) * 0.5 + k3(1.1) * 1.1 + k3(0.7) * 0.7
    close(weighted, -0.16 + kl_times_r / 5)


def test_beta_zero_needs_no_reference() -> None:
    logp, old = inputs()
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, beta=0.0, ref_logp=None)
    close(loss, 0.025)
    assert "kl" not in metrics
    with pytest.raises(ValueError):
        policy_loss(logp, old, ADVANTAGES, MASK, beta=0.04, ref_logp=None)


def test_masked_tokens_contribute_nothing() -> None:
    logp, old = inputs()
    loss, _ = policy_loss(logp, old, ADVANTAGES, MASK, beta=0.04, ref_logp=torch.zeros_like(RATIOS))
    loss.backward()
    # change everything at masked positions: log-probs, old log-probs, per-token advantages, reference
    garbage = torch.where(MASK, RATIOS.log(), torch.tensor(3.0)).requires_grad_()
    old_garbage = torch.where(MASK, 0.0, torch.tensor(-2.0))
    ref_garbage = torch.where(MASK, 0.0, torch.tensor(1.0))
    token_advantages = torch.where(MASK, ADVANTAGES[:, None], torch.tensor(100.0))
    other, _ = policy_loss(garbage, old_garbage, token_advantages, MASK, beta=0.04, ref_logp=ref_garbage)
    other.backward()
    close(other, loss)
    close(garbage.grad, logp.grad)
    assert (garbage.grad[~MASK] == 0).all()


def test_per_token_advantages_equal_broadcast_sequence_advantages() -> None:
    logp, old = inputs()
    per_sequence, _ = policy_loss(logp, old, ADVANTAGES, MASK)
    per_token, _ = policy_loss(logp, old, ADVANTAGES[:, None].expand(2, 4), MASK)
    close(per_token, per_sequence)


def test_is_weights_scale_the_surrogate_not_the_kl() -> None:
    logp, old = inputs()
    weights = torch.tensor([[2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0 t0 loss -1 * 2: token mean (-2 - 1.2 - 0.5 + 1.1 + 0.8) / 5 = -0.36
    loss, _ = policy_loss(logp, old, ADVANTAGES, MASK, aggregation="token_mean", is_weights=weights)
    close(loss, -0.36)
    ref = torch.zeros_like(RATIOS)
    with_kl, _ = policy_loss(logp, old, ADVANTAGES, MASK, aggregation="token_mean", is_weights=weights, beta=1.0,
                             ref_logp=ref)
    close(with_kl - loss, (k3(1.0) + k3(1.5) + k3(0.5) + k3(1.1) + k3(0.7)) / 5)


def test_on_policy_ratio_is_one_and_gradient_is_advantage() -> None:
    # mu = 1: old_logp is logp.detach(), r = 1 everywhere, loss = -mean A, gradient -A / |o_i| / B
    logp = torch.log(RATIOS).requires_grad_()
    loss, metrics = policy_loss(logp, logp.detach(), ADVANTAGES, MASK)
    close(loss, 0.0)  # (-1 + 1) / 2
    loss.backward()
    close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6, 0.0], [0.25, 0.25, 0.0, 0.0]])
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_ratio/region_mean"] == 0.0


def test_sequence_level_ratios_gspo() -> None:
    logp, old = inputs()
    # s_0 = exp((log 1 + log 1.5 + log 0.5) / 3) = 0.75^(1/3) = 0.9085603;  s_1 = exp((log 1.1 + log 0.7) / 2)
    # = 0.77^(1/2) = 0.8774964; both inside [0.8, 1.2]: loss = (-s_0 + s_1) / 2 = -0.0155319
    s0, s1 = 0.75 ** (1 / 3), 0.77**0.5
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, ratio_level="sequence")
    close(loss, (-s0 + s1) / 2)
    loss.backward()
    # gradient through the mean: d s_i / d logp_it = s_i / |o_i|; then 1/B: row 0 -s0 / 3 / 2, row 1 +s1 / 2 / 2
    close(logp.grad, [[-s0 / 6] * 3 + [0.0], [s1 / 4] * 2 + [0.0, 0.0]])
    assert metrics["ratio_mean"] == pytest.approx((s0 + s1) / 2)  # a mean over sequences
    # eps 0.05: range [0.95, 1.05]; both sequences below it; row 1 (A < 0) is clipped, row 0 (A > 0) is not
    loss, metrics = policy_loss(logp, old, ADVANTAGES, MASK, ratio_level="sequence", eps_low=0.05)
    close(loss, (-s0 + 0.95) / 2)
    assert metrics["clip_ratio/low_mean"] == 0.5 and metrics["clip_ratio/high_mean"] == 0.0


def test_registries_and_normalisers() -> None:
    assert set(AGGREGATIONS) == {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"}
    logp, old = inputs()
    # rows that count 2, tokens that count 5, B * L_max = 2 * 4
    assert loss_normaliser(MASK, "seq_mean_token_mean") == 2
    assert loss_normaliser(MASK, "token_mean") == 5
    assert loss_normaliser(MASK, "seq_mean_token_sum_norm", max_completion_length=4) == 8
    with pytest.raises(ValueError):
        loss_normaliser(MASK, "seq_mean_token_sum_norm")
    # a row masked out entirely is not a sequence of the DeepSeekMath mean (TRL would divide by 3 here)...
    padded = torch.cat([MASK, torch.zeros(1, 4, dtype=torch.bool)])
    assert loss_normaliser(padded, "seq_mean_token_mean") == 2
    three, _ = policy_loss(torch.cat([logp, logp[:1]]), torch.cat([old, old[:1]]), torch.tensor([1.0, -1.0, 5.0]),
                           padded)
    close(three, 0.025)
    # ...but is one of Dr. GRPO's B rows (the denominator is fixed by the batch's shape)
    assert loss_normaliser(padded, "seq_mean_token_sum_norm", max_completion_length=4) == 12
    # the sum of two micro-batches' shares with the whole batch's normaliser is the whole batch's loss
    for aggregation in AGGREGATIONS:
        whole, _ = policy_loss(logp, old, ADVANTAGES, MASK, aggregation=aggregation, max_completion_length=4)
        n = loss_normaliser(MASK, aggregation, max_completion_length=4)
        parts = [policy_loss(logp[i:i + 1], old[i:i + 1], ADVANTAGES[i:i + 1], MASK[i:i + 1], aggregation=aggregation,
                             normaliser=n)[0] for i in range(2)]
        close(sum(parts), whole)
    with pytest.raises(ValueError):
        policy_loss(logp, old, ADVANTAGES, MASK, aggregation="sum")  # type: ignore[arg-type]
