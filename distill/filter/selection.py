"""Per-problem selection: the pass-rate band and which correct traces of a problem to keep.

Both need every sample of a problem judged first, so the stage runs them in a second streaming pass over the
verified candidates. Pass one feeds `observe`, which keeps only a few integers per problem (and at most k candidate
keys), so memory grows with the number of problems, never with the number of traces.
"""

from __future__ import annotations

import heapq
from typing import Any

from distill.filter.steps import Step


class ProblemStats:
    """Samples and correct samples per problem, and the k best candidate keys per problem for a selection rule."""

    def __init__(self, *, rule: str, k: int | None, longest_share: float = 0.0) -> None:
        self.rule, self.k = rule, k
        self.samples: dict[str, list[int]] = {}  # pid -> [samples judged, correct]
        self.best: dict[str, list[tuple[Any, ...]]] = {}  # pid -> heap of (negated key, seq), the k best candidates
        # length_mix: the longest `n_long` in a second heap, the shortest `k - n_long` in `best`. The two heaps
        # hold opposite ends of one order, so a problem with at most k candidates has every one in one of them.
        self.n_long = round((k or 0) * longest_share) if rule == "length_mix" else 0
        self.longest: dict[str, list[tuple[Any, ...]]] = {}

    def observe(self, record: dict[str, Any], *, seq: int, correct: bool | None, candidate: bool) -> None:
        counts = self.samples.setdefault(record["id"], [0, 0])
        counts[0] += 1
        counts[1] += bool(correct)
        if not candidate or (self.rule == "all_correct" and self.k is None):
            return
        pid, key = record["id"], self._key(record, seq)
        limit = 1 if self.rule == "first_correct" else (self.k or 1) - self.n_long
        _keep_best(self.best.setdefault(pid, []), (tuple(-x for x in key), seq), limit)
        if self.n_long:  # the exact reverse order, so the two picks never overlap once there are more than k
            _keep_best(self.longest.setdefault(pid, []), (key, seq), self.n_long)

    def _key(self, record: dict[str, Any], seq: int) -> tuple[int, ...]:
        if self.rule in ("shortest_correct", "length_mix"):
            return (int(record.get("completion_tokens") or 0), int(record.get("sample") or 0), seq)
        return (int(record.get("sample") or 0), seq)

    def pass_rate(self, pid: str) -> float:
        total, correct = self.samples.get(pid, (0, 0))
        return correct / total if total else 0.0

    def selected(self, pid: str, seq: int) -> bool:
        if self.rule == "all_correct" and self.k is None:
            return True
        return any(s == seq for heap in (self.best, self.longest) for _, s in heap.get(pid, ()))


def _keep_best(heap: list[tuple[Any, ...]], entry: tuple[Any, ...], limit: int) -> None:
    """Keep the `limit` largest entries in a min-heap."""
    if len(heap) < limit:
        heapq.heappush(heap, entry)
    elif limit and entry > heap[0]:
        heapq.heapreplace(heap, entry)


class PassRateBand(Step):
    """Keep problems whose teacher pass rate lies in [lo, hi]: drop the trivially easy and the hopeless."""

    name, reasons = "pass_rate_band", ("pass_rate_out_of_band",)

    def __init__(self, stats: ProblemStats, *, band: tuple[float, float]) -> None:
        self.stats, self.band = stats, band

    def check(self, record: dict[str, Any]) -> str | None:
        if record["kind"] == "none":
            return None  # unverifiable: no pass rate to judge by
        lo, hi = self.band
        return None if lo <= self.stats.pass_rate(record["id"]) <= hi else "pass_rate_out_of_band"


class Selection(Step):
    """all_correct | first_correct (lowest sample index) | shortest_correct (fewest completion tokens) | length_mix
    (`longest_share` of the k from the longest, the rest from the shortest), capped at `max_per_problem`. Ties go to
    the lower sample index, then to the earlier trace in the input (the longest picks: the reverse)."""

    name, reasons = "selection", ("not_selected",)

    def __init__(self, stats: ProblemStats) -> None:
        self.stats = stats

    def check(self, record: dict[str, Any]) -> str | None:
        return None if self.stats.selected(record["id"], record["_seq"]) else "not_selected"


def selection_steps(config: Any, stats: ProblemStats) -> list[Step]:
    steps: list[Step] = []
    if config.pass_rate is not None:
        steps.append(PassRateBand(stats, band=config.pass_rate))
    return [*steps, Selection(stats)]
