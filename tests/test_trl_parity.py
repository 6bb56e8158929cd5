"""Parity with TRL 1.16's GRPOTrainer: identical tensors through TRL's own code and through align.rl.

A real GRPOTrainer is built once on the tiny DeepSeek-V2 preset. For the loss, its `_compute_loss` runs with
the per-token log-prob computation patched to return our tensor, so TRL's real loss code (ratios, clipping,
KL, IS correction, aggregation, clip metrics) sees exactly the tensors `policy_loss` sees. For advantages,
truncation masking and the TIS weight, `_generate_and_score_completions` runs with generation patched to
return fixed completions and a reward function returning fixed rewards.
"""

from collections import defaultdict
from itertools import product
from typing import Any

import pytest
import torch

from align.rl.advantages import group_advantages, handle_truncated, overlong_penalty
from align.rl.losses import policy_loss, truncated_is_weights

pytestmark = pytest.mark.precision
GROUP_SIZE = 3
BATCH, TOKENS = 6, 5
CURRENT_REWARDS: list[float] = []


def fixed_reward(completions: list, **kwargs: Any) -> list[float]:
    return list(CURRENT_REWARDS)


@pytest.fixture(scope="module")
def trainer(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.config.schema import ModelConfig
    from align.models.loading import build_model

    model = build_model(ModelConfig(preset="deepseek-v2-tiny", tokenizer="data/tokenizer-tiny"), tokenizer)
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")), num_generations=GROUP_SIZE,
        per_device_train_batch_size=BATCH, max_completion_length=TOKENS, report_to="none", use_cpu=True,
    )
    grpo = GRPOTrainer(model=model, reward_funcs=fixed_reward, args=args,
                       train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
    grpo.model.train()
    grpo.current_gradient_accumulation_steps = 1
    return grpo


def fresh_metrics(monkeypatch: pytest.MonkeyPatch, trainer: Any) -> None:
    monkeypatch.setattr(trainer, "_metrics", {"train": defaultdict(list), "eval": defaultdict(list)})


# -------------------------------------------------------------------------------------------------- loss

def loss_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    old_logp = -2 * torch.rand(BATCH, TOKENS, generator=generator) - 0.1
    # log-ratios spread over [-0.6, 0.6] (ratios 0.55 .. 1.82), shuffled: some below 1 - eps, some in
    # (1.2, 1.28) where eps_high = 0.28 changes the outcome, some above 1.28
    log_ratio = torch.linspace(-0.6, 0.6, BATCH * TOKENS)[torch.randperm(BATCH * TOKENS, generator=generator)]
    lengths = torch.tensor([5, 3, 1, 4, 0, 5])  # one completion with no counted token at all
    return {
        "logp": old_logp + log_ratio.view(BATCH, TOKENS),
        "old_logp": old_logp,
        "ref_logp": old_logp + 0.3 * torch.randn(BATCH, TOKENS, generator=generator),
        "rollout_logp": old_logp + 0.4 * torch.randn(BATCH, TOKENS, generator=generator),
        "mask": (torch.arange(TOKENS)[None, :] < lengths[:, None]).long(),
        "seq_advantages": torch.randn(BATCH, generator=generator),
        "token_advantages": torch.randn(BATCH, TOKENS, generator=generator),
    }


# TRL loss_type -> our aggregation; "dapo" normalises by the token count of the whole accumulated batch
# (`num_items_in_batch`), "bnpo" by the micro-batch's own.
AGGREGATION_OF = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
                  "dr_grpo": "seq_mean_token_sum_norm"}
# TRL's denominators: "grpo" divides by every row, the one with no counted token included (ours by the rows that
# count, see seq_mean_token_mean), "dapo" by the accumulated batch's tokens; the others are our defaults.
NORMALISER_OF = {"grpo": lambda mask, accumulated: float(mask.shape[0]), "bnpo": lambda mask, accumulated: None,
                 "dapo": lambda mask, accumulated: accumulated, "dr_grpo": lambda mask, accumulated: None}
CASES = [
    case for case in product(
        AGGREGATION_OF, ["token", "sequence"], [0.0, 0.04], [(0.2, None), (0.2, 0.28)], [False, True],
        [False, True], ["sequence", "token"])
    if (case[2] != 0.0 or not case[4])  # the KL bias correction only matters with a KL term
    # with TIS too align weighs the KL by pi_theta / pi_behav = r * w (the samples come from the engine), TRL by r
    # alone: a deliberate difference (test_rl_math.py::test_ratio_weighted_kl_uses_the_behaviour_ratio)
    and not (case[4] and case[5])
]


@pytest.mark.parametrize(("loss_type", "level", "beta", "epsilons", "bias_correction_kl", "tis", "advantage_shape"),
                         CASES)
def test_policy_loss_matches_trl(
    trainer: Any, monkeypatch: pytest.MonkeyPatch, loss_type: str, level: str, beta: float,
    epsilons: tuple[float, float | None], bias_correction_kl: bool, tis: bool, advantage_shape: str,
) -> None:
    tensors = loss_tensors()
    epsilon, epsilon_high = epsilons
    mask = tensors["mask"]
    advantages = tensors["seq_advantages" if advantage_shape == "sequence" else "token_advantages"]
    is_weights = truncated_is_weights(tensors["old_logp"], tensors["rollout_logp"], cap=1.2) if tis else None
    tokens_in_accumulated_batch = 2.0 * mask.sum().item()  # as if this were half of the accumulated batch

    ours_logp = tensors["logp"].clone().requires_grad_()
    ours, metrics = policy_loss(
        ours_logp, tensors["old_logp"], advantages, mask, eps_low=epsilon, eps_high=epsilon_high, beta=beta,
        ref_logp=tensors["ref_logp"] if beta else None, kl_ratio_weighted=bias_correction_kl,
        aggregation=AGGREGATION_OF[loss_type], ratio_level=level, max_completion_length=TOKENS,
        normaliser=NORMALISER_OF[loss_type](mask, tokens_in_accumulated_batch), is_weights=is_weights,
    )
    ours.backward()

    trl_logp = tensors["logp"].clone().requires_grad_()
    for name, value in {
        "loss_type": loss_type, "importance_sampling_level": level, "beta": beta, "epsilon_low": epsilon,
        "epsilon_high": epsilon if epsilon_high is None else epsilon_high, "max_completion_length": TOKENS,
        "use_vllm": tis, "vllm_importance_sampling_correction": tis,
        "_get_per_token_logps_and_entropies": lambda *args, **kwargs: (trl_logp, torch.zeros_like(trl_logp), None),
    }.items():
        monkeypatch.setattr(trainer, name, value)
    monkeypatch.setattr(trainer.args, "use_bias_correction_kl", bias_correction_kl)
    fresh_metrics(monkeypatch, trainer)
    inputs = {
        "prompt_ids": torch.zeros(BATCH, 2, dtype=torch.long), "prompt_mask": torch.ones(BATCH, 2, dtype=torch.long),
        "completion_ids": torch.zeros(BATCH, TOKENS, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": tensors["old_logp"],
        "num_items_in_batch": torch.tensor(tokens_in_accumulated_batch),
    }
    if beta:
        inputs["ref_per_token_logps"] = tensors["ref_logp"]
    if tis:
        inputs["importance_sampling_ratio"] = is_weights
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=1e-6, atol=1e-7)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    for key in ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else []):
        assert metrics[key] == pytest.approx(logged[key], rel=1e-6, abs=1e-7), key


def test_parity_cases_exercise_both_clip_sides_and_clip_higher() -> None:
    tensors = loss_tensors()
    ratio = (tensors["logp"] - tensors["old_logp"]).exp()[tensors["mask"].bool()]
    assert (ratio < 0.8).any() and (ratio > 1.28).any() and ((ratio > 1.2) & (ratio < 1.28)).any()


# ------------------------------------------------------------------------- advantages, truncation, TIS weight

def score(trainer: Any, monkeypatch: pytest.MonkeyPatch, rewards: torch.Tensor, completions: list[list[int]],
          sampling_logps: list[list[float]] | None = None) -> dict[str, torch.Tensor]:
    """Run TRL's `_generate_and_score_completions` on fixed completions and rewards ([P, G], prompt-major)."""
    CURRENT_REWARDS[:] = rewards.flatten().tolist()
    count = len(completions)

    def generate(prompts: list) -> tuple:
        assert len(prompts) == count
        return [[5, 6]] * count, completions, None, ["x"] * count, sampling_logps, {}, None, None

    monkeypatch.setattr(trainer, "_generate", generate)
    fresh_metrics(monkeypatch, trainer)
    prompts = [{"prompt": prompt} for prompt in "ab" for _ in range(GROUP_SIZE)]
    with torch.no_grad():
        return trainer._generate_and_score_completions(prompts)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("rewards", [[[0.0, 1.0, 2.0], [4.0, 4.0, 7.0]], [[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]])
def test_group_advantages_match_trl(
    trainer: Any, monkeypatch: pytest.MonkeyPatch, scale: str, rewards: list[list[float]]
) -> None:
    rewards_tensor = torch.tensor(rewards)
    monkeypatch.setattr(trainer, "scale_rewards", scale)
    eos = trainer.processing_class.eos_token_id
    out = score(trainer, monkeypatch, rewards_tensor, [[7, 8, eos]] * BATCH)
    torch.testing.assert_close(group_advantages(rewards_tensor, scale).flatten(), out["advantages"])


def test_masked_truncation_matches_trl(trainer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    eos = trainer.processing_class.eos_token_id
    completions = [[7, 8, eos], [7, 8, 9, 10, 11], [7, eos], [9] * 5, [7, 8, 9, eos], [7, 8]]
    truncated = torch.tensor([ids[-1] != eos for ids in completions])
    lengths = torch.tensor([len(ids) for ids in completions])
    full_mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long()
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]])
    monkeypatch.setattr(trainer, "mask_truncated_completions", True)
    monkeypatch.setattr(trainer, "scale_rewards", "group")
    out = score(trainer, monkeypatch, rewards, completions)
    kept_rewards, mask = handle_truncated(rewards.flatten(), full_mask, truncated, "mask")
    assert out["completion_mask"].tolist() == mask.tolist()
    # truncated completions leave the loss but stay in the group baseline, in TRL as here
    torch.testing.assert_close(group_advantages(kept_rewards.view(2, GROUP_SIZE), "group").flatten(), out["advantages"])


def test_truncated_is_weights_match_trl(trainer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 1.5
    for name, value in {"use_vllm": True, "vllm_importance_sampling_correction": True,
                        "vllm_importance_sampling_mode": "token_truncate",
                        "vllm_importance_sampling_clip_max": cap, "vllm_importance_sampling_clip_min": None,
                        "scale_rewards": "group"}.items():
        monkeypatch.setattr(trainer, name, value)
    eos = trainer.processing_class.eos_token_id
    completions = [[7, 8, eos], [7, 8, 9, 10, 11], [7, eos], [9, 9, 9, 9, eos], [7, 8, 9, eos], [7, 8, eos]]
    # the tiny model's log-probs sit near log(1/1024) = -6.93; shift the "rollout" ones around that
    offsets = torch.linspace(-0.6, 0.6, BATCH * TOKENS).view(BATCH, TOKENS)
    sampling = [[-6.93 + offsets[i, t].item() for t in range(len(ids))] for i, ids in enumerate(completions)]
    out = score(trainer, monkeypatch, torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]]), completions, sampling)
    mask = out["completion_mask"].bool()
    ours = truncated_is_weights(out["old_per_token_logps"], out["sampling_per_token_logps"], cap)
    torch.testing.assert_close(ours[mask], out["importance_sampling_ratio"][mask])
    assert (ours[mask] == cap).any() and (ours[mask] < 1).any()


@pytest.mark.parametrize(("max_length", "cache_length"), [(10, 4), (10, 0), (10, 10)])
def test_overlong_penalty_matches_trl(max_length: int, cache_length: int) -> None:
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(15))
    theirs = get_soft_overlong_punishment(max_length, cache_length)([[1] * n for n in lengths])
    torch.testing.assert_close(overlong_penalty(torch.tensor(lengths), max_length, cache_length), torch.tensor(theirs))
