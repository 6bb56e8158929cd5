"""The reward plug-in system: protocol checks, built-ins, weighted combination, a pip-installed third-party
plug-in, and faulty rewards in real Ray workers (raise, hang, die, NaN, wrong count)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys

import pytest
import torch

from align.rl.advantages import group_advantages, zero_std_groups
from rewards.base import Sample, Scores
from rewards.combine import combine_rewards
from rewards.format import format_match, soft_overlong
from rewards.math import answer_format, math_answer
from rewards.registry import RewardError, available, build, resolve, score
from tests.conftest import ROOT


def samples(*texts: str, answer: str = "26") -> list[Sample]:
    return [Sample([{"role": "user", "content": "q"}], t, {"answer": answer}, num_tokens=len(t.split()))
            for t in texts]


def test_math_answer_extracts_and_verifies():
    got = math_answer(samples("so 20 + 6 = 26", "#### 26", "the answer is 25", "no number", "\\boxed{26.0}"))
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math_answer(samples("x = \\boxed{\\frac{1}{2}}", answer="0.5")) == [1.0]  # math-verify's symbolic check
    assert answer_format(samples("work\n#### 26", "26")) == [1.0, 0.0]


def test_format_and_length_rewards():
    assert format_match(samples("<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>")) == [1.0, 0.0]
    assert format_match(samples("Answer: 7"), pattern=r"Answer: \d+") == [1.0]
    # DAPO soft overlong, max 10, cache 4: <= 6 tokens free, then -1/4 per token, -1 beyond 10
    texts = [" ".join(["w"] * n) for n in (6, 8, 10, 12)]
    assert soft_overlong(samples(*texts), max_tokens=10, cache_tokens=4) == [0.0, -0.5, -1.0, -1.0]


def test_registry_names_builtins_paths_and_typos():
    assert {"math_answer", "format_match", "code_execution", "reward_model"} <= set(available())
    assert resolve("tests.helpers.rewards:digit_fraction")(samples("a1")) == [0.5]
    with pytest.raises(KeyError, match="did you mean 'math_answer'"):
        resolve("math_anwser")


def test_score_checks_what_a_reward_returns():
    assert score("r", lambda s: [1, None], samples("a", "b")).values == [1.0, None]
    nan = score("r", lambda s: [math.nan, math.inf, 0.5], samples("a", "b", "c"))
    assert nan.values == [None, None, 0.5] and nan.info[0]["invalid"] == "nan"
    with pytest.raises(RewardError, match="reward 'r' returned 1 values for 2 samples"):
        score("r", lambda s: [1.0], samples("a", "b"))
    with pytest.raises(RewardError, match="returned str for sample 0"):
        score("r", lambda s: ["1"], samples("a"))

    async def slow_async(batch):
        await asyncio.sleep(0)
        return Scores([1.0] * len(batch), [{"n": 1}] * len(batch))

    assert score("r", slow_async, samples("a")).info == [{"n": 1}]
    keyword = build("tests.helpers.rewards:digit_fraction", {})
    assert keyword(samples("12ab")) == [0.5]


def test_combine_rewards_weights_and_missing_values():
    values = {"math": [1.0, 0.0, None], "format": [1.0, None, 1.0]}
    total, valid = combine_rewards(values, {"math": 1.0, "format": 0.5}, fallback=None)
    assert total[0].item() == 1.5 and valid.tolist() == [True, False, False] and total[1:].isnan().all()
    total, valid = combine_rewards(values, {"math": 1.0, "format": 0.5}, fallback=-1.0)
    assert total.tolist() == [1.5, -1.0, -1.0] and valid.all()


def test_failed_samples_leave_their_group_statistics():
    rewards = torch.tensor([[1.0, 0.0, float("nan"), 2.0], [5.0, float("nan"), float("nan"), 5.0]])
    valid = ~rewards.isnan()
    adv = group_advantages(rewards, "group", valid=valid)
    # group 0 over {1, 0, 2}: mean 1, unbiased std 1
    torch.testing.assert_close(adv[0], torch.tensor([0.0, -1 / 1.0001, 0.0, 1 / 1.0001]))
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert zero_std_groups(rewards).tolist() == [False, True]
    # the same as the unmasked formula on the valid rewards alone
    torch.testing.assert_close(group_advantages(torch.tensor([[1.0, 0.0, 2.0]]), "group")[0], adv[0, [0, 1, 3]])


def test_installed_plugin_is_found_by_name(plugin_path):
    code = ("from rewards.registry import available, build, score\n"
            "from rewards.base import Sample\n"
            "assert available()['brevity'] == 'align_reward_example:brevity'\n"
            "s = [Sample([], 'alpha beta gamma', {}), Sample([], 'nothing here', {})]\n"
            "print(score('keyword', build('keyword', {'keywords': ['alpha', 'beta']}), s))\n")
    env = {**os.environ, "PYTHONPATH": f"{plugin_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Scores(values=[1.0, 0.0], info=[{'found': ['alpha', 'beta']}, {'found': []}], steps=None)" in out.stdout
