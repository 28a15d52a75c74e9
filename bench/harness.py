"""One timing harness for every bench: interleaved rounds, a median of per-round ratios, its spread, the load.

On a shared 2-core machine an absolute time means little and single runs swing by 5-20%: a ratio only means
something when both sides ran under the same noise. So `compare(a, b)` runs one warm-up round (not counted: caches,
lazy imports, page cache), then `rounds` rounds in ABBA order (A B, B A, A B, ...) so neither side always goes first,
and reports the MEDIAN of the per-round ratios a/b with their min-max `spread`. The 1-minute load average at start
and end is kept (`load_avg`) so a noisy run can be recognised afterwards.

Each side is a callable that does one round of its work and returns what it measured, higher meaning better: a rate
(float), a `(work, seconds)` pair (the harness divides), or a mapping of named such quantities (e.g. {"wall": tok/s,
"cpu": tok per CPU-s}), one ratio per name both sides report. Seconds you want to report (parts of a call) can ride
along in the mapping; their ratios are computed but a bench need not report them.

Work per round: each bench's defaults are sized so every side's timed work is >= ~10 s per round on the 2-core dev
machine (scheduler noise is then well under 1%), with `DEFAULT_ROUNDS` counted rounds. Sized from the rates the
`--quick` runs measured (2026-12, machine loaded ~2-5): teacher 128 problems x 4 x 256 tokens at ~8-9k tok/s raw;
student 400 steps (~300k tokens; 240 steps took 6.7 s per side on an idle machine); onpolicy 60 steps (~1k
tokens/step at ~4.5k tok/s); filter 1,000 records at ~50 records/s; eval 1,024 samples at ~55 samples/s. `--quick`
is a smoke run: `QUICK_ROUNDS` rounds and the bench's own smaller work per round, marked `"quick": true` in its
JSON line; its ratios say the bench works, not how fast the stage is.

Bench files drop their own folder from sys.path (they are named like the packages they measure), so they load this
file by path under the module name `bench_harness`, which collides with nothing (the lines under each bench's
sys.path fix).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ROUNDS = 5  # counted rounds after the warm-up: a median of 5 ignores two disturbed rounds
QUICK_ROUNDS = 1
Quantity = float | tuple[float, float]
Measured = Quantity | Mapping[str, Quantity]
PRIMARY = "rate"  # the name a bare float or (work, seconds) is filed under


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--rounds N` and `--quick`, the same on every bench."""
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"counted rounds after one warm-up (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_ROUNDS} round(s), less work per round"
    )


def rounds_of(args: argparse.Namespace) -> int:
    """The counted rounds `args` asks for: `--rounds`, else the quick or the full default."""
    rounds = args.rounds if args.rounds is not None else QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if rounds < 1:
        raise ValueError(f"--rounds: expected at least 1 counted round, got {rounds}")
    return rounds


def quantities(value: Measured, *, side: str) -> dict[str, float]:
    """A side's measurement as named floats; (work, seconds) pairs are divided here."""
    items = value.items() if isinstance(value, Mapping) else [(PRIMARY, value)]
    out = {}
    for name, quantity in items:
        if isinstance(quantity, tuple):
            work, seconds = quantity
            if seconds <= 0:
                raise ValueError(f"side {side}, {name}: expected (work, seconds) with seconds > 0, got {quantity}")
            quantity = work / seconds
        if isinstance(quantity, bool) or not isinstance(quantity, (int, float)):
            raise TypeError(f"side {side}, {name}: expected a number or (work, seconds), got {quantity!r}")
        out[name] = float(quantity)
    return out


@dataclass
class Comparison:
    """Counted rounds only: per-round values of each side and per-round ratios a/b per quantity name."""

    names: tuple[str, str]
    values: dict[str, list[dict[str, float]]]
    ratios: dict[str, list[float]]
    load_avg: tuple[float, float]
    quick: bool = False
    order: list[str] = field(default_factory=list)  # every call made, warm-up included ("warmup:a", "0:b", ...)

    @property
    def rounds(self) -> int:
        return len(next(iter(self.values.values())))

    def ratio(self, name: str = PRIMARY) -> float:
        """Median of the per-round ratios of `name`."""
        return statistics.median(self._ratios(name))

    def spread(self, name: str = PRIMARY) -> list[float]:
        """[min, max] of the per-round ratios of `name`, rounded like the ratio."""
        ratios = self._ratios(name)
        return [round(min(ratios), 3), round(max(ratios), 3)]

    def median(self, side: str, name: str = PRIMARY) -> float:
        """Median over the counted rounds of one side's `name`."""
        return statistics.median(v[name] for v in self.values[side])

    def fields(self, key: str, name: str = PRIMARY) -> dict[str, Any]:
        """The JSON keys every bench reports: `key` (the median ratio), spread, rounds, load_avg, quick."""
        return {
            key: round(self.ratio(name), 3),
            "spread": self.spread(name),
            "rounds": self.rounds,
            "load_avg": [round(x, 2) for x in self.load_avg],
            "quick": self.quick,
        }

    def _ratios(self, name: str) -> list[float]:
        if name not in self.ratios:
            raise KeyError(f"no ratio {name!r}: both sides reported only {sorted(self.ratios)}")
        return self.ratios[name]


def compare(
    a: Callable[[], Measured],
    b: Callable[[], Measured],
    *,
    rounds: int,
    names: tuple[str, str] = ("stage", "raw"),
    quick: bool = False,
    warmup: bool = True,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Run `a` and `b` alternately: one warm-up round (uncounted), then `rounds` rounds in ABBA order.

    Ratios are a/b per quantity name both sides report, one per round; a ratio of a round is only ever taken between
    two calls made back to back, so slow drifts in machine load cancel. `log` (default: stderr) gets one line per
    call and per round.
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    sides = dict(zip(names, (a, b), strict=True))
    load_start = os.getloadavg()[0]
    result = Comparison(names, {n: [] for n in names}, {}, (load_start, load_start), quick)
    schedule = [("warmup", names)] if warmup else []
    schedule += [(str(i), names if i % 2 == 0 else names[::-1]) for i in range(rounds)]
    for label, order in schedule:
        got = {}
        for name in order:
            result.order.append(f"{label}:{name}")
            got[name] = quantities(sides[name](), side=name)
            say(f"round {label} {name}: " + ", ".join(f"{k} {v:,.4g}" for k, v in got[name].items()))
        common = [k for k in got[names[0]] if k in got[names[1]]]
        ratios = {k: got[names[0]][k] / got[names[1]][k] for k in common if got[names[1]][k]}
        say(f"round {label}: {names[0]}/{names[1]} " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        if label == "warmup":
            continue
        for name in names:
            result.values[name].append(got[name])
        for k, v in ratios.items():
            result.ratios.setdefault(k, []).append(v)
    result.load_avg = (load_start, os.getloadavg()[0])
    return result
