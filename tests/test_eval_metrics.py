"""pass@k / maj@k against hand-computed values, and the same numbers through Hugging Face `evaluate`."""

from __future__ import annotations

from math import comb

import evaluate
import pytest

from conftest import REPO
from distill.pass_at_k import majority_correct, pass_at_k, score


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (5, 0, 3, 0.0),
        (3, 3, 2, 1.0),
        (64, 16, 1, 0.25),  # pass@1 is the mean over samples (R1: k = 64 on AIME)
        (8, 6, 3, 1.0),  # fewer wrong samples than k: every k-subset holds a correct one
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples per problem, got 4"):
        pass_at_k(4, 1, 5)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_correct(["12", "12", "7"], [True, True, False])
    assert not majority_correct(["7", "12", "7", ""], [False, True, False, False])
    assert majority_correct(["", "", "3"], [False, False, True]), "one answer among non-answers wins"
    assert not majority_correct(["", ""], [False, False])
    assert majority_correct(["5", "6"], [True, False]) and not majority_correct(["6", "5"], [False, True])


def test_score_per_problem_means():
    result = score(
        [["1", "1", "2", "1"], ["3", "4", "", ""]], [[True, True, False, True], [False, False, False, False]], k=[1, 2]
    )
    assert result["pass@1"] == pytest.approx((0.75 + 0.0) / 2)
    assert result["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["maj@4"] == 0.5 and result["problems"] == 2 and result["samples"] == 4
    with pytest.raises(ValueError, match="same number of samples"):
        score([["1"], ["1", "2"]], [[True], [True, False]], k=[1])


def test_pass_at_k_loads_as_an_evaluate_metric_module():
    metric = evaluate.load(str(REPO / "distill" / "pass_at_k.py"))
    predictions = [["12", "12", "7"], ["1", "2", ""]]
    references = [[True, True, False], [False, False, False]]
    assert metric.compute(predictions=predictions, references=references, k=[1, 2]) == score(
        predictions, references, k=[1, 2]
    )
