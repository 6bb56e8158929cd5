"""The torch rollout engine on the tiny DeepSeek-V2 MoE: greedy picks transformers' argmax, sampled
log-probs equal a teacher-forced forward pass, seeds make sampling reproducible, weights update in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.config.schema import ModelConfig
from align.data.chat import render_ids
from align.models.loading import build_model
from rollout.sampling import sampled_logprobs
from rollout.torch_engine import SamplingConfig, TorchEngine
from tests.helpers.greedy import assert_greedy_path, assert_stopped, teacher_forced_logp

pytestmark = pytest.mark.precision
TOL = 1e-4  # fp32 log-probs of a padded batch with a KV cache against one row without (also the near-tie margin)
PROMPTS = ["State the final answer to the following arithmetic problem: 12 + 7 =", "Hello there", "How many legs?"]


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = build_model(ModelConfig(preset="deepseek-v2-tiny", tokenizer="data/tokenizer-tiny", seed=3), tokenizer)
    prompts = [render_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    return model, TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id), prompts


def test_greedy_is_transformers_choice_at_every_position(setup):
    """The batched engine (padded rows, a KV cache) against transformers on one row without a cache: its pick
    at every position (near-ties aside: tests/helpers/greedy.py) with transformers' log-probs."""
    model, engine, prompts = setup
    completions = engine.generate(prompts, SamplingConfig(n=1, max_new_tokens=20, temperature=0))
    for prompt, completion in zip(prompts, completions):
        assert_stopped(completion.token_ids, engine.eos, 20, completion.finished)
        assert_greedy_path(completion.token_ids, teacher_forced_logp(model, prompt, completion.token_ids), TOL,
                           completion.logprobs)


def test_sampled_logprobs_equal_a_teacher_forced_pass(setup):
    model, engine, prompts = setup
    completions = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=16, temperature=1.0, seed=5))
    assert len(completions) == 12 and [c.prompt_index for c in completions] == [0] * 4 + [1] * 4 + [2] * 4
    for completion in completions:
        ids = torch.tensor([prompts[completion.prompt_index] + completion.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        start = len(prompts[completion.prompt_index]) - 1
        recomputed = F.log_softmax(logits[start:], -1).gather(-1, ids[0, start + 1:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), recomputed, rtol=1e-4, atol=1e-4)


def test_same_seed_same_samples_other_seed_other_samples(setup):
    _, engine, prompts = setup
    def run(seed):
        return [c.token_ids for c in engine.generate(prompts, SamplingConfig(n=3, max_new_tokens=12, seed=seed))]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_update_weights_changes_outputs_and_rejects_wrong_names(setup, tokenizer):
    model, _, prompts = setup
    other = build_model(ModelConfig(preset="deepseek-v2-tiny", tokenizer="data/tokenizer-tiny", seed=4), tokenizer)
    engine = TorchEngine(build_model(ModelConfig(preset="deepseek-v2-tiny", tokenizer="data/tokenizer-tiny", seed=3),
                                     tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    engine.update_weights(other.state_dict())
    want = TorchEngine(other, tokenizer.eos_token_id, tokenizer.pad_token_id).generate(prompts, greedy)
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == [c.token_ids for c in want]
    with pytest.raises(ValueError, match="weight sync: missing"):
        engine.update_weights({"model.embed_tokens.weight": other.state_dict()["model.embed_tokens.weight"],
                               "not.a.weight": torch.zeros(1)})


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (20, 1.0)])
def test_engine_and_learner_logprobs_agree_under_top_p_and_top_k(setup, top_k, top_p):
    """At temperature 0.7 with top-p 0.9 or top-k 20 (fp32, the same weights), the log-prob the engine reports
    for each sampled token is the learner's (`sampled_logprobs` on a full forward pass), inside the nucleus."""
    model, engine, prompts = setup
    config = SamplingConfig(n=4, max_new_tokens=16, temperature=0.7, top_p=top_p, top_k=top_k, seed=7)
    completions = engine.generate(prompts, config)
    truncated_somewhere = False
    for completion in completions:
        start = len(prompts[completion.prompt_index])
        ids = torch.tensor([prompts[completion.prompt_index] + completion.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        learner = sampled_logprobs(logits, ids, temperature=0.7, top_k=top_k, top_p=top_p)
        torch.testing.assert_close(learner.logp[0, start:], torch.tensor(completion.logprobs), rtol=0, atol=TOL)
        assert not learner.outside[0, start:].any()
        full = sampled_logprobs(logits, ids, temperature=0.7).logp[0, start:]
        truncated_somewhere |= bool((learner.logp[0, start:] > full + 1e-3).any())  # renormalised: higher
    assert truncated_somewhere, "the filter never removed any mass: the test would not see a mismatch"


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(setup, tokenizer):
    """Use a token the model often emits as the end token, so rows stop at different steps and leave the
    batch (and the KV cache) while the others go on: every row must still decode exactly as alone."""
    model, engine, prompts = setup
    greedy = SamplingConfig(max_new_tokens=20, temperature=0)
    free = [c.token_ids for c in engine.generate(prompts, greedy)]
    stop = next(t for t in free[0][2:] if not all(t in row for row in free))
    early = TorchEngine(model, stop, tokenizer.pad_token_id)
    completions = early.generate(prompts, greedy)
    assert any(c.finished for c in completions) and not all(c.finished for c in completions)
    for prompt, completion in zip(prompts, completions):
        assert_stopped(completion.token_ids, stop, 20, completion.finished)
        assert_greedy_path(completion.token_ids, teacher_forced_logp(model, prompt, completion.token_ids), TOL,
                           completion.logprobs)
    sampled = early.generate(prompts, SamplingConfig(n=4, max_new_tokens=16, temperature=0.05, seed=11))
    assert len({len(c.token_ids) for c in sampled}) > 1
    for completion in sampled:
        ids = torch.tensor([prompts[completion.prompt_index] + completion.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        start = len(prompts[completion.prompt_index]) - 1
        recomputed = F.log_softmax(logits[start:] / 0.05, -1).gather(-1, ids[0, start + 1:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), recomputed, rtol=1e-4, atol=1e-4)
