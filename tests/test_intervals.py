"""`distill.intervals` against values computed by hand, and paired differences whose answer is known."""

from __future__ import annotations

import math
import random

import pytest

from distill import intervals


def test_interval_by_hand() -> None:
    # rates 0, 1, 1, 1: mean 0.75, sample sd sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5, SE 0.25, half-width 0.49
    estimate = intervals.mean_interval([0.0, 1.0, 1.0, 1.0])
    assert estimate.mean == 0.75 and estimate.problems == 4
    assert estimate.low == pytest.approx(0.75 - 0.49)
    assert estimate.high == 1.0, "clipped: a pass rate stops at 100%"
    # rates 0.25, 0.5, 0.75: mean 0.5, sd 0.25, SE 0.25 / sqrt(3)
    estimate = intervals.mean_interval([0.25, 0.5, 0.75])
    assert (estimate.low, estimate.high) == pytest.approx((0.5 - 1.96 * 0.25 / math.sqrt(3), 0.5 + 0.49 / 3**0.5))
    assert intervals.mean_interval([0.0, 0.0, 0.0, 0.25]).low == 0.0
    assert intervals.mean_interval([0.5]).as_dict() == {"mean": 0.5, "low": 0.5, "high": 0.5, "problems": 1}
    with pytest.raises(ValueError, match="at least one problem"):
        intervals.mean_interval([])


def test_pass_rate_clusters_samples_by_problem() -> None:
    """Four samples of one problem count as one observation: the interval is the one of the per-problem rates."""
    verdicts = [[True, True, False, False], [True, True, True, True], [False, False, False, False]]
    assert intervals.pass_rate(verdicts) == intervals.mean_interval([0.5, 1.0, 0.0])


def test_paired_difference_sign_and_interval() -> None:
    """B solves every problem A solves plus one in ten more: the difference is +0.1, its interval excludes zero,
    and it is far tighter than A's own interval (the problems' difficulty cancels)."""
    rng = random.Random(0)
    a = {f"p{i}": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for i in range(200)}
    b = {p: min(1.0, rate + 0.1) if i % 2 == 0 else rate for i, (p, rate) in enumerate(a.items())}
    expected = sum(b[p] - a[p] for p in a) / len(a)
    forward, backward = intervals.paired(b, a), intervals.paired(a, b)
    assert forward.mean == pytest.approx(expected) and expected > 0
    assert forward.low > 0 and forward.excludes_zero()
    assert backward.mean == pytest.approx(-expected) and backward.high < 0, "the sign follows the order"
    own = intervals.mean_interval(list(a.values()))
    assert forward.high - forward.low < (own.high - own.low) / 3
    same = intervals.paired(a, dict(a))
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    assert intervals.paired({"x": 1.0, "y": 0.5}, {"x": 0.5, "z": 1.0}).problems == 1, "shared problems only"


def test_percent_and_spread() -> None:
    assert intervals.percent(intervals.Estimate(0.741, 0.692, 0.79, 200)) == "74.1 (69.2–79.0)"
    assert intervals.percent({"mean": -0.135, "low": -0.17, "high": -0.1}, signed=True) == "-13.5 (-17.0 to -10.0)"
    assert intervals.spread([0.5, 0.7]) == pytest.approx(
        {"mean": 0.6, "sd": math.sqrt(0.02), "min": 0.5, "max": 0.7, "runs": 2}
    )
