"""Model presets: the tiny one runs on CPU, the paper's ones have the paper's parameter counts."""

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from align.models.presets import PRESETS, build_config, count_parameters_meta

# deepseek-v2-tiny, counted by hand (vocab 1024, hidden 128, 4 heads):
#   embeddings + untied lm_head            2 * 1024 * 128                               = 262,144
#   attention per layer: q_a 128*48, q_b 48*(4*32), kv_a 128*(32+16), kv_b 32*(4*(16+32)) = 4 * 6,144
#                        o 128*128 = 16,384; norms q_a 48 + kv_a 32 + 2 * 128 = 336      = 41,296
#   3 attention layers                                                                    = 123,888
#   dense MLP (layer 0) 3 * 128 * 256                                                     = 98,304
#   MoE layer: 8 experts * 3 * 128 * 64 = 196,608; shared 3 * 128 * (2*64) = 49,152;
#              gate 8 * 128 = 1,024                                                       = 246,784
#   2 MoE layers                                                                          = 493,568
#   final norm                                                                            = 128
#   total                                                                                 = 978,032
#   active: 2 of 8 routed experts, so 3/4 of 2 * 196,608 idle (294,912), and one embedding row of 128
#   read instead of 131,072 (130,944 idle): 978,032 - 294,912 - 130,944                    = 552,176
#   tied embeddings: total 978,032 - 131,072 = 846,960, all of it read by the LM head:
#   active 846,960 - 294,912                                                              = 552,048
TINY_TOTAL = 978_032
TINY_ACTIVE = 552_176


def test_tiny_preset_builds_and_runs() -> None:
    torch.manual_seed(0)
    config = build_config("deepseek-v2-tiny")
    model = DeepseekV2ForCausalLM(config).eval()
    assert sum(param.numel() for param in model.parameters()) == TINY_TOTAL
    assert count_parameters_meta(config) == {"total": TINY_TOTAL, "active": TINY_ACTIVE}
    tied = build_config("deepseek-v2-tiny", tie_word_embeddings=True)
    assert count_parameters_meta(tied) == {"total": 846_960, "active": 552_048}
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        outputs = model(input_ids=input_ids, output_router_logits=True)
    assert outputs.logits.shape == (2, 12, 1024)
    assert torch.isfinite(outputs.logits).all()
    # Layer 0 is dense; layers 1 and 2 each return [batch * seq, routed experts] logits.
    assert [tuple(logits.shape) for logits in outputs.router_logits] == [(24, 8), (24, 8)]


def test_overrides_and_vocab_argument() -> None:
    config = build_config("deepseek-v2-tiny", vocab_size=512, num_hidden_layers=2)
    assert (config.vocab_size, config.num_hidden_layers) == (512, 2)
    assert config.topk_method == "group_limited_greedy"
    assert build_config("deepseek-v2", topk_group=2).topk_group == 2


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="deepseek-v2, deepseek-v2-lite, deepseek-v2-tiny"):
        build_config("deepseek-v3")


def test_paper_routing_settings() -> None:
    v2 = build_config("deepseek-v2")
    assert (v2.topk_method, v2.n_group, v2.topk_group) == ("group_limited_greedy", 8, 3)
    assert (v2.n_shared_experts, v2.n_routed_experts, v2.num_experts_per_tok) == (2, 160, 6)
    lite = build_config("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.topk_method == "greedy"
    assert all(isinstance(PRESETS[name](), DeepseekV2Config) for name in PRESETS if name.startswith("deepseek"))


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9)],
)
def test_paper_parameter_counts_on_meta(name: str, total: float, active: float) -> None:
    counts = count_parameters_meta(build_config(name))
    assert counts["total"] == pytest.approx(total, rel=0.05)
    assert counts["active"] == pytest.approx(active, rel=0.05)
