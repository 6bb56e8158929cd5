"""DeepSeek-V2 balance losses against hand-computed values, and routing parity with transformers' gate."""

import pytest
import torch
from transformers import DeepseekV2ForCausalLM

from align.models.balance import balance_losses, moe_balance_loss, route
from align.models.presets import deepseek_v2_tiny

# Four tokens, four experts; devices hold experts {0, 1} and {2, 3}. Logits are log-probabilities, so
# the softmax affinities s_ti are exactly these rows (each row sums to 1, no ties within a row).
AFFINITIES = torch.tensor(
    [
        [0.50, 0.30, 0.15, 0.05],  # t0: top-1 {0}, top-2 {0,1}
        [0.40, 0.10, 0.35, 0.15],  # t1: top-1 {0}, top-2 {0,2}
        [0.05, 0.15, 0.50, 0.30],  # t2: top-1 {2}, top-2 {2,3}
        [0.10, 0.45, 0.25, 0.20],  # t3: top-1 {1}, top-2 {1,2}
    ]
)
# P_i = column means: e0 (0.5+0.4+0.05+0.1)/4 = 0.2625, e1 (0.3+0.1+0.15+0.45)/4 = 0.25,
#                     e2 (0.15+0.35+0.5+0.25)/4 = 0.3125, e3 (0.05+0.15+0.3+0.2)/4 = 0.175   (sum 1)
# P'_d: device 0 = 0.2625 + 0.25 = 0.5125, device 1 = 0.3125 + 0.175 = 0.4875
ONE_SEQUENCE = torch.zeros(4, dtype=torch.long)
UNIT_ALPHAS = {"alpha_expert": 1.0, "alpha_device": 1.0, "alpha_comm": 1.0}


def _values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: round(float(value), 6) for key, value in losses.items()}


def test_top1_two_devices_by_hand() -> None:
    # counts [2, 1, 1, 0]; f = E/(K T) * count = 4/4 * count = [2, 1, 1, 0]
    # L_expert = 2*0.2625 + 1*0.25 + 1*0.3125 + 0*0.175 = 1.0875
    # f' = [mean(2,1), mean(1,0)] = [1.5, 0.5]; L_device = 1.5*0.5125 + 0.5*0.4875 = 1.0125
    # tokens reaching device 0: t0, t1, t3 = 3, device 1: t2 = 1; f'' = D/(M T) * [3, 1] = 2/4 * [3, 1]
    # = [1.5, 0.5]; L_comm = 1.0125
    losses = balance_losses(
        AFFINITIES.log(), ONE_SEQUENCE, top_k=1, n_devices=2, max_devices=1, **UNIT_ALPHAS)
    assert _values(losses) == {"expert": 1.0875, "device": 1.0125, "comm": 1.0125}


def test_top2_greedy_by_hand() -> None:
    # chosen: t0 {0,1}, t1 {0,2}, t2 {2,3}, t3 {1,2}; counts [2, 2, 3, 1]
    # f = 4/(2*4) * count = [1, 1, 1.5, 0.5]
    # L_expert = 0.2625 + 0.25 + 1.5*0.3125 + 0.5*0.175 = 1.06875
    # f' = [1, 1]; L_device = 0.5125 + 0.4875 = 1.0
    # device 0 reached by t0, t1, t3 (3); device 1 by t1, t2, t3 (3); with M = 2: f'' = 2/(2*4) * 3 = 0.75
    # each, L_comm = 0.75 * (0.5125 + 0.4875) = 0.75.   With M = 1: f'' = 1.5 each, L_comm = 1.5.
    logits = AFFINITIES.log()
    losses = balance_losses(logits, ONE_SEQUENCE, top_k=2, n_devices=2, max_devices=2, **UNIT_ALPHAS)
    assert _values(losses) == {"expert": 1.06875, "device": 1.0, "comm": 0.75}
    losses_m1 = balance_losses(logits, ONE_SEQUENCE, top_k=2, n_devices=2, max_devices=1, **UNIT_ALPHAS)
    assert round(float(losses_m1["comm"]), 6) == 1.5


def test_top2_group_limited_by_hand_and_alphas_scale() -> None:
    # one group of 2 experts kept per token (n_groups = 2, topk_groups = 1); group score = best expert:
    # t0 g=(0.5, 0.15) -> {0,1}; t1 (0.4, 0.35) -> {0,1}; t2 (0.15, 0.5) -> {2,3}; t3 (0.45, 0.25) -> {0,1}
    # counts [3, 3, 1, 1]; f = 0.5 * count = [1.5, 1.5, 0.5, 0.5]
    # L_expert = 1.5*(0.2625 + 0.25) + 0.5*(0.3125 + 0.175) = 0.76875 + 0.24375 = 1.0125
    # f' = [1.5, 0.5]; L_device = 1.5*0.5125 + 0.5*0.4875 = 1.0125
    # device 0 reached by t0, t1, t3, device 1 by t2; f'' = 2/(1*4) * [3, 1] = [1.5, 0.5]; L_comm = 1.0125
    # With V2's alphas: 0.003 * 1.0125 = 0.0030375, 0.05 * 1.0125 = 0.050625, 0.02 * 1.0125 = 0.02025
    losses = balance_losses(
        AFFINITIES.log(), ONE_SEQUENCE, top_k=2, n_devices=2, max_devices=1,
        alpha_expert=0.003, alpha_device=0.05, alpha_comm=0.02,
        method="group_limited_greedy", n_groups=2, topk_groups=1,
    )
    assert {key: round(float(value), 8) for key, value in losses.items()} == {
        "expert": 0.0030375, "device": 0.050625, "comm": 0.02025,
    }


def test_route_group_limited_differs_from_greedy() -> None:
    _, greedy = route(AFFINITIES.log(), top_k=2)
    scores, limited = route(
        AFFINITIES.log(), top_k=2, n_groups=2, topk_groups=1, method="group_limited_greedy")
    assert torch.allclose(scores, AFFINITIES)
    assert greedy.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 0]]
    assert limited.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]]


def test_balanced_routing_gives_alpha() -> None:
    # sum_i f_i = E/(K T) * sum_i count_i = E/(K T) * K T = E, and sum_i P_i = 1 (softmax rows sum to 1).
    # Perfect balance, f_i = 1 for all i: L_expert = a1 * sum_i P_i = a1, whatever the affinities.
    # (Uniform affinities P_i = 1/E give the same: a1 * (1/E) * sum_i f_i = a1, whatever the counts.)
    # Likewise f'_d = 1 gives L_device = a2 * sum_d P'_d = a2; each device serving T*M/D tokens gives
    # f''_d = 1 and L_comm = a3.  Here 8 tokens, 4 experts, top-1, each expert first choice of 2 tokens.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator)
    favourite = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    logits[torch.arange(8), favourite] += 10.0
    losses = balance_losses(
        logits, torch.zeros(8, dtype=torch.long), top_k=1, n_devices=2, max_devices=1,
        alpha_expert=0.003, alpha_device=0.05, alpha_comm=0.02,
    )
    assert torch.allclose(torch.stack(list(losses.values())), torch.tensor([0.003, 0.05, 0.02]))
    # All tokens on expert 0 (f = [4, 0, 0, 0], P_0 close to 1) costs nearly E = 4 times more.
    logits[:, 0] += 20.0
    collapsed = balance_losses(
        logits, torch.zeros(8, dtype=torch.long), top_k=1, n_devices=2, max_devices=1,
        alpha_expert=0.003, alpha_device=0.05, alpha_comm=0.02,
    )
    assert float(collapsed["expert"]) > 3.9 * 0.003


def test_padding_is_ignored() -> None:
    padded_logits = torch.cat([AFFINITIES.log(), torch.tensor([[9.0, -3.0, 4.0, 0.5], [0.0, 8.0, 0.0, 1.0]])])
    padded_segments = torch.tensor([0, 0, 0, 0, -1, -1])
    padded = balance_losses(
        padded_logits, padded_segments, top_k=1, n_devices=2, max_devices=1, **UNIT_ALPHAS)
    assert _values(padded) == {"expert": 1.0875, "device": 1.0125, "comm": 1.0125}


def test_all_padding_gives_zero_with_gradient_path() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    losses = balance_losses(logits, torch.full((3,), -1), top_k=1, n_devices=2, max_devices=1, **UNIT_ALPHAS)
    assert all(float(value.detach()) == 0.0 for value in losses.values())
    sum(losses.values()).backward()
    assert logits.grad is not None


def test_packed_segments_average_per_sequence() -> None:
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(5, 8, generator=generator)
    second = torch.randn(3, 8, generator=generator) * 3.0
    kwargs = {"top_k": 2, "n_devices": 4, "max_devices": 2, **UNIT_ALPHAS,
              "method": "group_limited_greedy", "n_groups": 4, "topk_groups": 2}
    alone_first = balance_losses(first, torch.zeros(5, dtype=torch.long), **kwargs)
    alone_second = balance_losses(second, torch.zeros(3, dtype=torch.long), **kwargs)
    # Interleaved, with arbitrary ids and padding between: one packed row holding both sequences.
    packed_logits = torch.cat([first[:2], second[:1], torch.zeros(1, 8), first[2:], second[1:]])
    packed_ids = torch.tensor([7, 7, 3, -1, 7, 7, 7, 3, 3])
    packed = balance_losses(packed_logits, packed_ids, **kwargs)
    as_one = balance_losses(torch.cat([first, second]), torch.zeros(8, dtype=torch.long), **kwargs)
    for key in ("expert", "device", "comm"):
        mean = (alone_first[key] + alone_second[key]) / 2
        assert torch.allclose(packed[key], mean), key
        # T differs per sequence, so one pooled sequence is not the same thing.
        assert not torch.allclose(as_one[key], mean), key


def test_gradient_flows_through_affinities_only() -> None:
    # Top-1 example above: f = [2, 1, 1, 0] is a constant, so dL_expert/dlogits = d(sum_i f_i P_i)/dlogits.
    logits = AFFINITIES.log().clone().requires_grad_(True)
    losses = balance_losses(logits, ONE_SEQUENCE, top_k=1, n_devices=2, max_devices=1, **UNIT_ALPHAS)
    losses["expert"].backward()
    reference_logits = AFFINITIES.log().clone().requires_grad_(True)
    frac = torch.tensor([2.0, 1.0, 1.0, 0.0])
    (frac * reference_logits.softmax(dim=-1).mean(dim=0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.allclose(logits.grad, reference_logits.grad)


def test_moe_balance_loss_sums_layers() -> None:
    generator = torch.Generator().manual_seed(2)
    layers = (torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator))
    segments = torch.tensor([[0, 0, 0], [1, 1, -1]])  # [batch, seq], flattened like the router's tokens
    kwargs = {"top_k": 2, "n_devices": 4, "max_devices": 2, "alpha_expert": 0.003, "alpha_device": 0.05,
              "alpha_comm": 0.02}
    total = moe_balance_loss(layers, segments, **kwargs)
    per_layer = [balance_losses(logits, segments.reshape(-1), **kwargs) for logits in layers]
    for key in ("expert", "device", "comm"):
        assert torch.allclose(total[key], per_layer[0][key] + per_layer[1][key])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_devices": 3}, "divisible by n_devices"),
        ({"max_devices": 3}, "max_devices"),
        ({"top_k": 5}, "top_k"),
        ({"method": "sinkhorn"}, "method"),
        ({"method": "group_limited_greedy", "n_groups": 3}, "divisible by n_groups"),
        ({"method": "group_limited_greedy", "n_groups": 2, "topk_groups": 1, "top_k": 3}, "kept groups"),
    ],
)
def test_invalid_configuration_raises(kwargs: dict, message: str) -> None:
    arguments = {"top_k": 1, "n_devices": 2, "max_devices": 1, **UNIT_ALPHAS, **kwargs}
    with pytest.raises(ValueError, match=message):
        balance_losses(AFFINITIES.log(), ONE_SEQUENCE, **arguments)


# The tiny preset routes top-2 among topk_group=2 of 4 groups: the two best experts always lie in the
# two best groups, so there its group limit never changes a choice. topk_group=1 makes it bite.
@pytest.mark.precision
@pytest.mark.parametrize(
    ("method", "n_group", "topk_group", "limit_bites"),
    # top-2 within 2 of 4 groups never binds (the two best experts lie in the two best groups); the
    # preset's 1 of 2 groups does.
    [("greedy", 2, 1, False), ("group_limited_greedy", 4, 2, False), ("group_limited_greedy", 2, 1, True)],
)
def test_route_matches_transformers_gate(method: str, n_group: int, topk_group: int, limit_bites: bool) -> None:
    torch.manual_seed(0)
    config = deepseek_v2_tiny(topk_method=method, n_group=n_group, topk_group=topk_group)
    model = DeepseekV2ForCausalLM(config).eval()
    gates = [layer.mlp.gate for layer in model.model.layers[config.first_k_dense_replace:]]
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = [gate.register_forward_hook(lambda _m, _i, out: captured.append(out)) for gate in gates]
    with torch.no_grad():
        # A wider router spreads the affinities, so the group limit has choices to change.
        for gate in gates:
            gate.weight.normal_(std=0.5)
        input_ids = torch.randint(0, config.vocab_size, (3, 20))
        outputs = model(input_ids=input_ids, output_router_logits=True)
    for handle in handles:
        handle.remove()

    assert len(outputs.router_logits) == len(gates) == 2
    changed_by_limit = 0
    for layer_logits, (gate_logits, _, gate_indices) in zip(outputs.router_logits, captured, strict=True):
        # The model returns the gate's pre-softmax logits, one row per token of the flattened batch.
        assert layer_logits.shape == (3 * 20, config.n_routed_experts)
        assert torch.equal(layer_logits, gate_logits)
        assert not torch.allclose(layer_logits.sum(dim=-1), torch.ones(60))
        _, chosen = route(layer_logits, config.num_experts_per_tok, config.n_group, config.topk_group, method)
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter_(1, gate_indices, 1.0))
        _, greedy = route(layer_logits, config.num_experts_per_tok)
        changed_by_limit += int((greedy != chosen).any(dim=-1).sum())
        group_size = config.n_routed_experts // config.n_group
        groups_used = chosen.view(-1, config.n_group, group_size).amax(dim=-1).sum(dim=-1)
        assert method == "greedy" or int(groups_used.max()) <= config.topk_group
    assert (changed_by_limit > 0) == limit_bites
