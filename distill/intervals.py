"""95% intervals for pass@1 and for the difference between two models scored on the same problems.

pass@1 is the mean over problems of each problem's pass rate (its correct samples / its k samples). The k samples of
one problem are not independent (an easy problem is solved by most of them), so the standard error is taken over
problems, not over problems x samples: sd(pass rates) / sqrt(problems), which is the cluster-robust standard error
of the mean over all samples with problems as clusters. The interval is the normal one, mean +- 1.96 SE, clipped
to what a rate can be. A paired difference takes the per-problem differences of two models on the problems both
were scored on: the problem-to-problem variation they share cancels, so it is much tighter than two separate
intervals, and it is the interval to read when asking "is B better than A?" (Miller, "Adding Error Bars to Evals",
2024, recommends both).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill import files

Z95 = 1.96
METHOD = (
    "95% normal interval over problems: mean of per-problem pass rates +- 1.96 x their standard error "
    "(samples of one problem are clustered, not independent)"
)


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    problems: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_interval(values: list[float], *, bounds: tuple[float, float] = (0.0, 1.0)) -> Estimate:
    """The mean of `values` (one per problem) and its 95% normal interval, clipped to `bounds`. One value has no
    spread to measure: its interval is the point itself."""
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one problem")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return Estimate(mean=mean, low=max(bounds[0], mean - half), high=min(bounds[1], mean + half), problems=n)


def pass_rate(verdicts: Iterable[list[bool]]) -> Estimate:
    """pass@1 with its interval from per-problem verdict lists (as `distill.pass_at_k.score` takes them)."""
    return mean_interval([sum(v) / len(v) for v in verdicts])


def paired(a: dict[str, float], b: dict[str, float]) -> Estimate:
    """a - b over the problems both were scored on (per-problem pass rates by problem key), with its interval."""
    shared = sorted(a.keys() & b.keys())
    return mean_interval([a[p] - b[p] for p in shared], bounds=(-1.0, 1.0))


def spread(values: list[float]) -> dict[str, float]:
    """Between-run spread of one score over repeated runs: mean, sample sd, min, max."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "runs": len(values)}


def pass_rates(samples: Path, label: str, *, problems: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Per problem (`benchmark/id`), the share of `label`'s samples in a `samples.jsonl` that were correct. With
    `problems` ({benchmark: ids}), a problem `label` has no sample of (its prompt did not fit) counts 0, as its
    score counts it."""
    correct: dict[str, list[bool]] = defaultdict(list)
    for sample in files.read_jsonl(samples):
        if sample["model"] == label:
            correct[f"{sample['benchmark']}/{sample['id']}"].append(bool(sample["verdict"]["correct"]))
    rates = {problem: sum(v) / len(v) for problem, v in correct.items()}
    for benchmark, ids in (problems or {}).items():
        for problem in ids:
            rates.setdefault(f"{benchmark}/{problem}", 0.0)
    return rates


def percent(estimate: Estimate | dict[str, Any], *, signed: bool = False) -> str:
    """`74.1 (69.2–79.0)` for tables; `+2.0 (−1.1 to +5.1)` for a signed difference."""
    values = estimate.as_dict() if isinstance(estimate, Estimate) else estimate
    mean, low, high = (100 * values[k] for k in ("mean", "low", "high"))
    if signed:
        return f"{mean:+.1f} ({low:+.1f} to {high:+.1f})"
    return f"{mean:.1f} ({low:.1f}–{high:.1f})"
