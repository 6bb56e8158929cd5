"""Process supervision from the reward side: per-step scores (`Scores.steps`), their checks in the registry,
the built-in `math_steps`, and the mapping of character ends to the tensors `process_advantages` takes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.rl.advantages import process_advantages
from align.rl.steps import decoded_prefix_lengths, merge_steps, step_tensors, step_token_ends
from rewards.base import Sample, Scores, Step
from rewards.math import evaluate, math_answer, math_steps
from rewards.registry import RewardError, available, build, score

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer-tiny"

CHAIN = " 67 - 73 = -6\n-6 - 62 = -68\n#### -68"
LEGS = "bee: 5 * 6 = 30 legs\nlion: 2 * 4 = 8 legs\n30 + 8 = 38\n#### 38"


def sample(text: str, answer: str) -> Sample:
    return Sample([{"role": "user", "content": "q"}], text, {"answer": answer})


def lines(text: str) -> list[str]:
    """The lines of text, each with its newline."""
    return text.splitlines(keepends=True)


def test_math_steps_scores_each_line_and_ends_at_line_ends():
    got = math_steps([sample(CHAIN, "-68"), sample(LEGS, "38")])
    assert got.values == [1.0, 1.0]
    assert [[s.score for s in steps] for steps in got.steps] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    for text, steps in zip([CHAIN, LEGS], got.steps):
        ends = [len("".join(lines(text)[: i + 1])) for i in range(len(lines(text)))]
        assert [s.end for s in steps] == ends  # after each newline; the last line ends at the text's end
        assert ends[-1] == len(text) and CHAIN[:14] == " 67 - 73 = -6\n"


def test_math_steps_wrong_steps_and_answer():
    wrong = " 67 - 73 = 6\n6 - 62 = -56\n#### -56"  # first step wrong, second right from a wrong start
    got = math_steps([sample(wrong, "-68"), sample("bee: 5 * 6 = 31 legs\n31 + 8 = 39\n#### 39", "38")])
    assert [s.score for s in got.steps[0]] == [0.0, 1.0, 0.0]
    assert [s.score for s in got.steps[1]] == [0.0, 1.0, 0.0]
    assert got.values == [0.0, 0.0]


def test_math_steps_other_lines_missing_answer_and_no_steps():
    text = "Let me add.\n2 + 3 * 4 = 14\nthat is all\n"
    got = math_steps([sample(text, "14"), sample("no arithmetic here", "3"), sample("5 = 5\n#### 5", "5")])
    assert got.steps[0] == [Step(1.0, len("Let me add.\n2 + 3 * 4 = 14\n"))]  # no `####` line: no final step
    assert got.values[0] == 1.0  # the outcome is math_answer's (here the last number)
    assert got.steps[1] is None and got.values[1] == 0.0
    assert got.steps[2] == [Step(1.0, 12)]  # "5 = 5" has no operator: not a step
    assert got.values == math_answer([sample(text, "14"), sample("no arithmetic here", "3"),
                                      sample("5 = 5\n#### 5", "5")])


def test_evaluate_is_a_small_integer_parser():
    assert [evaluate(e) for e in ["67 - 73", "-6 - 62", "2 + 3 * 4", "3 - -4", "2 * -3"]] == [-6, -68, 14, 7, -6]
    assert [evaluate(e) for e in ["5", "3 -", "3 ++ 4", "1 2 + 3", "2 ** 3", "1 / 2", "__import__('os')", ""]] == [
        None] * 8


def test_math_steps_is_a_builtin_checked_by_the_registry():
    assert available()["math_steps"] == "rewards.math:math_steps"
    got = score("math_steps", build("math_steps", {}), [sample(CHAIN, "-68"), sample("nothing", "1")])
    assert got.values == [1.0, 0.0] and got.steps == [[Step(1.0, 14), Step(1.0, 28), Step(1.0, 36)], None]


@pytest.mark.parametrize(("steps", "message"), [
    ([[Step(1.0, 2)]], "returned 1 step lists for 2 samples"),
    ([None, [Step(math.nan, 2)]], "score nan for step 0 of sample 1"),
    ([None, [Step(1.0, 2), Step(math.inf, 3)]], "score inf for step 1 of sample 1"),
    ([None, [Step(1.0, 0)]], r"end 0 for step 0 of sample 1, outside \(0, 4\]"),
    ([None, [Step(1.0, 5)]], r"end 5 for step 0 of sample 1, outside \(0, 4\]"),
    ([None, [Step(1.0, 3), Step(1.0, 2)]], "end 2 for step 1 of sample 1, before the previous step's end 3"),
    ([None, [(1.0, 2)]], "tuple as step 0 of sample 1, not a Step"),
])
def test_registry_rejects_malformed_steps(steps, message):
    with pytest.raises(RewardError, match=f"reward 'r' .*{message}"):
        score("r", lambda batch: Scores([1.0] * len(batch), steps=steps), [sample("ab", "1"), sample("abcd", "1")])


def test_registry_keeps_valid_steps():
    steps = [None, [Step(1, 2), Step(0.5, 2), Step(0.0, 4)]]  # equal ends are fine; int scores become floats
    got = score("r", lambda batch: Scores([1.0, None], steps=steps), [sample("ab", "1"), sample("abcd", "1")])
    assert got.steps == [None, [Step(1.0, 2), Step(0.5, 2), Step(0.0, 4)]] and got.values == [1.0, None]
    assert score("r", lambda batch: [1.0] * len(batch), [sample("ab", "1")]).steps is None


def test_step_token_ends_cover_each_line_with_the_tiny_tokenizer():
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(TINY_TOKENIZER))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    for text, answer in [(CHAIN, "-68"), (LEGS, "38")]:
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]  # as sampled
        assert decode(ids) == text
        lengths = decoded_prefix_lengths(ids, tokenizer, text)
        assert lengths == [len(decode(ids[:k])) for k in range(len(ids) + 1)]  # the stream, as prefix decodes
        steps = math_steps([sample(text, answer)]).steps[0]
        ends = step_token_ends(lengths, [s.end for s in steps])
        assert ends == sorted(ends) and ends[-1] == len(ids)  # the last step takes the EOS: stopping is credited
        starts = [0, *ends[:-1]]
        assert [decode(ids[a:b]) for a, b in zip(starts, ends)] == lines(text)  # this tokenizer keeps "\n" apart


def test_prefix_lengths_count_a_split_character_once_it_is_whole():
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(TINY_TOKENIZER))
    text = "x = \u00e9"  # the tiny byte-level tokenizer splits the e-acute over two tokens
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths = decoded_prefix_lengths(ids, tokenizer, text)
    assert lengths[-1] == len(text) and lengths[-2] == len("x = ")  # a prefix decode would count a U+FFFD
    assert step_token_ends(lengths, [len(text)]) == [len(ids)]

    class Slow:  # no tokenizers backend: each prefix is decoded
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "ab"[: len(ids)]

    assert decoded_prefix_lengths([5, 6, 7], Slow(), "ab") == [0, 1, 2, 2]


def test_step_token_ends_edge_cases():
    lengths = [0, 2, 2, 4, 6]  # tokens "ab", "" (a skipped special token), "c\n", "de"
    assert step_token_ends(lengths, [1, 2, 3, 4, 5, 6]) == [1, 1, 3, 3, 4, 4]
    assert step_token_ends(lengths, [7, 0]) == [4, 0]  # past the text: T; 0 needs no token
    assert step_token_ends([0, 1, 1], [1]) == [2]  # the text's end takes the trailing EOS
    assert step_token_ends([0, 0], [0]) == [1]  # a completion that is only EOS: its one step is that token
    assert step_token_ends([0], [3]) == [0]


def test_step_tensors_pad_to_the_most_steps():
    rewards, mask, ends = step_tensors([[(1.0, 3), (0.5, 7)], [], [(2.0, 4)], [(0.0, 1), (1.0, 2), (3.0, 5)]], 2)
    assert rewards.shape == mask.shape == ends.shape == (2, 2, 3)
    assert rewards.dtype == torch.float32 and mask.dtype == torch.bool and ends.dtype == torch.long
    assert rewards.tolist() == [[[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]], [[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]]
    assert mask.tolist() == [[[True, True, False], [False, False, False]], [[True, False, False], [True] * 3]]
    assert ends.tolist() == [[[3, 7, 0], [0, 0, 0]], [[4, 0, 0], [1, 2, 5]]]
    empty = step_tensors([[], []], 1)
    assert [t.shape for t in empty] == [(2, 1, 1)] * 3 and not empty[1].any()
    with pytest.raises(ValueError, match="groups of 2"):
        step_tensors([[]] * 3, 2)


def test_merge_steps_weights_outcomes_and_order():
    per_reward = {"steps": [Step(1.0, 4), Step(0.0, 10)], "format": None}
    got = merge_steps(per_reward, {"steps": 2.0, "format": 0.5}, {"steps": 1.0, "format": 1.0}, 10)
    assert got == [(2.0, 4), (0.0, 10), (0.5, 10)]  # the outcome step ends at the completion's end, after (stable)
    got = merge_steps({"format": None, "steps": [Step(1.0, 10)]}, {"steps": 1.0, "format": -1.0},
                      {"steps": 0.0, "format": 1.0}, 12)
    assert got == [(1.0, 10), (-1.0, 12)]  # sorted by end, whatever the rewards' order
    assert merge_steps({"a": [], "b": None}, {"a": 1.0, "b": 1.0}, {"a": 0.25, "b": 3.0}, 5) == [(0.25, 5), (3.0, 5)]
    assert merge_steps({"a": [Step(1.0, 2)]}, {"a": 1.0}, {"a": None}, 5) == [(1.0, 2)]  # steps need no value
    assert merge_steps({"a": [Step(1.0, 2)], "b": None}, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": None}, 5) is None


def test_step_tensors_through_process_advantages_by_hand():
    # one group of two completions, T = 5: A has steps scoring 1 (tokens 0-1) and 0 (tokens 2-3), B one step 1
    rewards, mask, ends = step_tensors([[(1.0, 2), (0.0, 4)], [(1.0, 3)]], 2)
    advantages = process_advantages(rewards, mask, ends, num_tokens=5)
    # R = {1, 0, 1}: mean 2/3, unbiased std sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 2) = sqrt(1/3)
    d = math.sqrt(1 / 3) + 1e-4
    a1, a2, b1 = (1 / 3) / d, (-2 / 3) / d, (1 / 3) / d
    expected = torch.tensor([[[a1 + a2, a1 + a2, a2, a2, 0.0], [b1, b1, b1, 0.0, 0.0]]])
    torch.testing.assert_close(advantages, expected)


def test_math_completions_end_to_end_to_advantages():
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(TINY_TOKENIZER))
    texts = [CHAIN, " 67 - 73 = 6\n#### 6"]
    scored = math_steps([sample(t, "-68") for t in texts])
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    per_completion = []
    for i, text in enumerate(texts):
        merged = merge_steps({"math_steps": scored.steps[i]}, {"math_steps": 1.0}, {"math_steps": scored.values[i]},
                             len(text))
        token_ends = step_token_ends(decoded_prefix_lengths(ids[i], tokenizer, text), [end for _, end in merged])
        per_completion.append([(s, e) for (s, _), e in zip(merged, token_ends)])
    num_tokens = max(map(len, ids))
    advantages = process_advantages(*step_tensors(per_completion, 2), num_tokens=num_tokens)
    # steps 1, 1, 1 | 0, 0: the right completion's tokens all gain, the wrong one's all lose
    assert (advantages[0, 0, : len(ids[0])] > 0).all() and (advantages[0, 1, : len(ids[1])] < 0).all()
    assert (advantages[0, 1, len(ids[1]):] == 0).all()
