"""Weighted mixtures: how many problems each data source gives, decided before any generation.

Weights are relative shares (`2, 1, 1` = half, a quarter, a quarter). Counts are integers that add up to the
mixture's total and each lie within one of its exact share (largest-remainder apportionment, ties to the earlier
source), so the same recipe always yields the same counts. Without `mixture.total` the mixture is the largest one
every source can fill at those shares. Which problems a source gives is its own order: file order, or its `seed`
shuffle, then `limit`; so a mixture is as deterministic as its sources, and problem ids do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from distill.errors import RecipeError

T = TypeVar("T")


def shares(weights: Sequence[float], total: int) -> list[int]:
    """`total` split by `weights`: floors of the exact shares, then one more to the largest remainders."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [math.floor(x + 1e-9) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def largest_total(available: Sequence[int], weights: Sequence[float]) -> int:
    """The largest total whose shares every source can fill."""
    weight_sum = sum(weights)
    total = min(math.floor(a * weight_sum / w + 1e-9) for a, w in zip(available, weights, strict=True))
    while total > 0 and any(c > a for c, a in zip(shares(weights, total), available, strict=True)):
        total -= 1
    return total


def plan(available: Sequence[int], weights: Sequence[float], *, total: int | None, names: Sequence[str]) -> list[int]:
    """Problems to take from each source. Fails (naming the source) when a source cannot fill its share."""
    for index, (count, name) in enumerate(zip(available, names, strict=True)):
        if count == 0:
            raise RecipeError(f"data.{index} ({name}): weight {weights[index]} but no problems to mix (see its drops)")
    if total is None:
        return shares(weights, largest_total(available, weights))
    counts = shares(weights, total)
    for index, (count, have) in enumerate(zip(counts, available, strict=True)):
        if count > have:
            raise RecipeError(
                f"mixture.total: {total} problems at these weights asks data.{index} ({names[index]}) for {count} "
                f"problems, but it has {have}; the largest total these sources allow is "
                f"{largest_total(available, weights)} (or lower that source's weight, or raise its `limit`)"
            )
    return counts


def interleave(groups: Sequence[Sequence[T]]) -> list[T]:
    """Every item, the groups spread evenly through the list (item i of a group of n sits at (i + 0.5) / n, ties in
    group order), so any prefix of the work, e.g. a generation stopped halfway, holds the mixture's proportions."""
    keyed = [((i + 0.5) / len(group), g, i) for g, group in enumerate(groups) for i in range(len(group))]
    return [groups[g][i] for _, g, i in sorted(keyed)]
