"""DeepSeekMoE routing and the three DeepSeek-V2 balance losses, as pure functions on tensors.

Notation (DeepSeek-V2, arXiv 2405.04434, section 2.2.3): a sequence has T tokens, N_r = E routed
experts, K_r = top_k chosen per token, experts split into D devices (contiguous equal groups), each
token may send to at most M devices. s_it is the softmax affinity of token t for expert i.

Which expert a token picks is copied from transformers' `DeepseekV2TopkRouter` (transformers 5.19),
so that the losses count exactly the experts the model ran:
- `router_logits = hidden @ gate.weight.T` in float32, shape [batch * seq, E]; this pre-softmax
  tensor is what `output_router_logits=True` returns, one per MoE layer.
- `scores = softmax(router_logits)` over all E experts, in float32.
- "greedy": the top_k highest scores.
- "group_limited_greedy": experts split into n_groups contiguous groups; a group's score is its
  best expert's score; the topk_groups best groups are kept, every other score is set to 0, then
  the top_k highest (masked) scores. With n_groups = D and topk_groups = M this is the paper's
  device-limited routing. It can only change a choice when top_k > topk_groups (otherwise the
  top_k best experts always lie in the topk_groups best groups).
- `routed_scaling_factor` multiplies the chosen weights after selection and `norm_topk_prob` is not
  read by the router: neither changes which experts are chosen, nor the balance losses.
"""

from typing import Literal

import torch

RoutingMethod = Literal["greedy", "group_limited_greedy"]
ROUTING_METHODS: tuple[str, ...] = ("greedy", "group_limited_greedy")


def _check_routing(num_experts: int, top_k: int, n_groups: int, topk_groups: int, method: str) -> None:
    if method not in ROUTING_METHODS:
        raise ValueError(f"method must be one of {ROUTING_METHODS}, got {method!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if method == "group_limited_greedy":
        if n_groups < 1 or num_experts % n_groups != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by n_groups={n_groups}")
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
        reachable = topk_groups * (num_experts // n_groups)
        if top_k > reachable:
            raise ValueError(
                f"top_k={top_k} exceeds the {reachable} experts in the topk_groups={topk_groups} "
                f"kept groups of {num_experts // n_groups}"
            )


def route(
    router_logits: torch.Tensor,
    top_k: int,
    n_groups: int = 1,
    topk_groups: int = 1,
    method: RoutingMethod = "greedy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax affinities and the experts the DeepSeek-V2 gate picks from them.

        s_t = softmax(router_logits_t)                                  # over all E experts
        greedy:                chosen_t = TopK(s_t, top_k)
        group_limited_greedy:  g_tj = max_{i in group j} s_ti
                               kept_t = TopK(g_t, topk_groups)
                               chosen_t = TopK(s_t * 1[group(i) in kept_t], top_k)

    Args:
        router_logits: [N, E] pre-softmax gate outputs (as returned with `output_router_logits=True`).
        top_k: experts chosen per token (K_r, `num_experts_per_tok`).
        n_groups, topk_groups: `n_group` / `topk_group` of the config; used by group_limited_greedy only.
        method: `topk_method` of the config.

    Returns:
        scores: [N, E] float32 softmax affinities, differentiable w.r.t. router_logits.
        chosen: [N, E] float32 0/1 mask with exactly top_k ones per row; carries no gradient.
    """
    num_experts = router_logits.shape[-1]
    _check_routing(num_experts, top_k, n_groups, topk_groups, method)
    scores = router_logits.softmax(dim=-1, dtype=torch.float32)  # [N, E]
    with torch.no_grad():
        candidates = scores.detach()
        if method == "group_limited_greedy":
            grouped = candidates.view(-1, n_groups, num_experts // n_groups)  # [N, G, E/G]
            group_scores = grouped.max(dim=-1).values  # [N, G]
            kept_groups = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, kept_groups, 1.0)  # [N, G]
            expert_mask = group_mask.repeat_interleave(num_experts // n_groups, dim=-1)  # [N, E]
            # Zero rather than -inf, as in transformers, so ties resolve the same way.
            candidates = candidates.masked_fill(expert_mask == 0, 0.0)
        chosen_idx = torch.topk(candidates, k=top_k, dim=-1, sorted=False).indices  # [N, top_k]
        chosen = torch.zeros_like(candidates).scatter_(1, chosen_idx, 1.0)  # [N, E]
    return scores, chosen


def balance_losses(
    router_logits: torch.Tensor,
    segment_ids: torch.Tensor,
    top_k: int,
    n_devices: int,
    max_devices: int,
    alpha_expert: float,
    alpha_device: float,
    alpha_comm: float,
    method: RoutingMethod = "greedy",
    n_groups: int = 1,
    topk_groups: int = 1,
) -> dict[str, torch.Tensor]:
    """DeepSeek-V2 expert-, device- and communication-balance losses of one MoE layer.

    Per sequence of T tokens (E = N_r routed experts, K = top_k, experts split into D = n_devices
    contiguous groups E_d of E/D experts, M = max_devices):

        f_i    = E / (K T) * #{t : t chose expert i}            P_i = 1/T * sum_t s_ti
        L_expert = alpha_expert * sum_i f_i P_i
        f'_d   = 1/|E_d| * sum_{i in E_d} f_i                   P'_d = sum_{i in E_d} P_i
        L_device = alpha_device * sum_d f'_d P'_d
        f''_d  = D / (M T) * #{t : t chose at least one expert in E_d}
        L_comm   = alpha_comm * sum_d f''_d P'_d

    Each loss is computed per sequence, then averaged over sequences. When every expert gets its
    fair share (f_i = 1) the first two equal their alpha exactly, whatever the affinities; when
    every token reaches exactly M devices and each device serves T*M/D tokens, L_comm = alpha_comm.
    The counts (f) are constants: gradients reach router_logits through the affinities (P) only.

    Args:
        router_logits: [N, E] pre-softmax gate outputs of one layer.
        segment_ids: [N] long, the sequence each token belongs to; -1 marks padding (ignored).
            Ids must be unique across the whole batch (packed rows hold several sequences; give
            sequences in different rows different ids). Any non-negative values work.
        top_k, method, n_groups, topk_groups: the routing of `route`; DeepSeek-V2 routes with
            group_limited_greedy, n_groups = D, topk_groups = M.
        n_devices: D, number of expert-parallel devices; E must be divisible by D.
        max_devices: M <= D, devices a token may send to (normalises f'').
        alpha_expert, alpha_device, alpha_comm: a1, a2, a3 (V2: 0.003, 0.05, 0.02).

    Returns:
        {"expert", "device", "comm"}: scalar tensors, already scaled by their alpha. Zero (still
        attached to the graph) when every token is padding.
    """
    num_tokens, num_experts = router_logits.shape
    if segment_ids.shape != (num_tokens,):
        raise ValueError(f"segment_ids must have shape [{num_tokens}], got {list(segment_ids.shape)}")
    if n_devices < 1 or num_experts % n_devices != 0:
        raise ValueError(f"num_experts={num_experts} must be divisible by n_devices={n_devices}")
    if not 1 <= max_devices <= n_devices:
        raise ValueError(f"max_devices must be in [1, n_devices={n_devices}], got {max_devices}")
    _check_routing(num_experts, top_k, n_groups, topk_groups, method)

    valid = segment_ids >= 0
    if not bool(valid.any()):
        zero = router_logits.sum() * 0.0
        return {"expert": zero, "device": zero.clone(), "comm": zero.clone()}
    # Compact arbitrary ids to 0..S-1 so per-sequence sums are one index_add each.
    _, seq_of_token = torch.unique(segment_ids[valid], return_inverse=True)  # [Nv]
    num_seqs = int(seq_of_token.max()) + 1
    scores, chosen = route(router_logits[valid], top_k, n_groups, topk_groups, method)  # [Nv, E] x2

    experts_per_device = num_experts // n_devices
    tokens = torch.bincount(seq_of_token, minlength=num_seqs).to(scores.dtype)  # [S], T per sequence
    score_sum = scores.new_zeros(num_seqs, num_experts).index_add(0, seq_of_token, scores)
    picks = scores.new_zeros(num_seqs, num_experts).index_add(0, seq_of_token, chosen)
    sent = chosen.view(-1, n_devices, experts_per_device).amax(dim=-1)  # [Nv, D] 0/1
    reaches = scores.new_zeros(num_seqs, n_devices).index_add(0, seq_of_token, sent)

    prob = score_sum / tokens[:, None]  # P [S, E]
    frac = picks * (num_experts / top_k) / tokens[:, None]  # f [S, E]
    prob_dev = prob.view(num_seqs, n_devices, experts_per_device).sum(dim=-1)  # P' [S, D]
    frac_dev = frac.view(num_seqs, n_devices, experts_per_device).mean(dim=-1)  # f' [S, D]
    frac_comm = reaches * (n_devices / max_devices) / tokens[:, None]  # f'' [S, D]

    return {
        "expert": alpha_expert * (frac * prob).sum(dim=-1).mean(),
        "device": alpha_device * (frac_dev * prob_dev).sum(dim=-1).mean(),
        "comm": alpha_comm * (frac_comm * prob_dev).sum(dim=-1).mean(),
    }


def moe_balance_loss(
    router_logits_per_layer: tuple[torch.Tensor, ...] | list[torch.Tensor],
    segment_ids: torch.Tensor,
    top_k: int,
    n_devices: int,
    max_devices: int,
    alpha_expert: float,
    alpha_device: float,
    alpha_comm: float,
    method: RoutingMethod = "greedy",
    n_groups: int = 1,
    topk_groups: int = 1,
) -> dict[str, torch.Tensor]:
    """`balance_losses` of every MoE layer, SUMMED over layers:  L_x = sum_layers L_x(layer).

    Summed, not averaged: DeepSeek-V2 adds each gate's balance loss to the objective (its own
    modelling code attaches every gate's aux loss to the graph), so a1, a2, a3 are per-layer
    weights and averaging would silently divide them by the number of MoE layers.

    Args:
        router_logits_per_layer: one [N, E] tensor per MoE layer, e.g. `outputs.router_logits` of a
            DeepseekV2ForCausalLM called with `output_router_logits=True` (N = batch * seq).
        segment_ids: [N] or [batch, seq] (flattened row-major, as the router flattens tokens);
            -1 marks padding. Other arguments as in `balance_losses`.

    Returns:
        {"expert", "device", "comm"}: scalar tensors summed over layers.
    """
    if len(router_logits_per_layer) == 0:
        raise ValueError(
            "router_logits_per_layer is empty: was the model called with output_router_logits=True?")
    flat_segments = segment_ids.reshape(-1)
    per_layer = [
        balance_losses(
            logits, flat_segments, top_k, n_devices, max_devices, alpha_expert, alpha_device, alpha_comm,
            method, n_groups, topk_groups,
        )
        for logits in router_logits_per_layer
    ]
    return {key: torch.stack([losses[key] for losses in per_layer]).sum() for key in per_layer[0]}
