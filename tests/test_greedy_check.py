"""The greedy-path check the engine tests use (tests/helpers/greedy.py): lenient only at near-ties."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.greedy import assert_greedy_path, assert_stopped

# Three positions over a vocabulary of 3: a clear winner, a near-tie (0.004 apart, as seen on an AVX2 CPU),
# and another clear winner.
REFERENCE = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.996, -3.0], [0.0, -2.0, 3.0]]), dim=-1)


def test_the_argmax_everywhere_passes_and_a_near_tie_may_go_either_way():
    assert assert_greedy_path([0, 0, 2], REFERENCE, tol=0.05) == 0
    assert assert_greedy_path([0, 1, 2], REFERENCE, tol=0.05) == 1  # the runner-up of the near-tie
    with pytest.raises(AssertionError, match="position 1.*top-2 margin 0.00400"):
        assert_greedy_path([0, 1, 2], REFERENCE, tol=0.001)  # not within this tolerance


def test_a_wrong_pick_where_the_margin_is_clear_fails():
    with pytest.raises(AssertionError, match="position 2: the engine picked token 0"):
        assert_greedy_path([0, 0, 0], REFERENCE, tol=0.05)


def test_the_engines_log_probs_must_match_the_reference():
    picked = REFERENCE[[0, 1, 2], [0, 1, 2]].tolist()
    assert_greedy_path([0, 1, 2], REFERENCE, tol=0.05, engine_logprobs=[v + 0.01 for v in picked])
    with pytest.raises(AssertionError):
        assert_greedy_path([0, 1, 2], REFERENCE, tol=0.05, engine_logprobs=[picked[0], picked[1] + 0.2, picked[2]])


def test_a_decode_stops_at_its_first_eos_or_at_the_limit():
    assert_stopped([5, 6, 2], eos=2, max_new=4, finished=True)
    assert_stopped([5, 6, 7, 8], eos=2, max_new=4, finished=False)
    assert_stopped([5, 6, 7, 2], eos=2, max_new=4, finished=True)  # eos as the last allowed token
    for tokens, finished in (([5, 2, 6, 2], True), ([5, 6], False), ([5, 6, 7, 8, 2], True), ([5, 6, 2], False)):
        with pytest.raises(AssertionError):
            assert_stopped(tokens, eos=2, max_new=4, finished=finished)
