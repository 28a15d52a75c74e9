"""The summary `make bench` prints at the end: one row per bench target, from each bench's last JSON line.

    .venv/bin/python bench/table.py OUTPUT_FILE...     # the saved stdout of each bench

A bench's `"target"` maps each targeted key to a bound, e.g. {"ratio_vs_raw": ">= 0.95", "rss_growth": "< 1.5"}; a
bare number means `ratio_vs_raw >= number`. The first targeted key is the timed ratio, the one `spread` belongs to.
"""

from __future__ import annotations

import json
import operator
import sys
from pathlib import Path
from typing import Any

OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
COLUMNS = ("bench", "key", "ratio", "spread", "rounds", "target", "met")


def last_json(path: Path) -> dict[str, Any]:
    """The last line of `path` that parses as a JSON object: what each bench prints last."""
    for line in reversed(path.read_text().splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"{path}: no JSON line found (expected the bench's last line to be its JSON summary)")


def met(value: Any, bound: str) -> str:
    """'yes' / 'no' for `value` against a bound like '>= 0.95', '-' when there is no value."""
    op, _, number = bound.partition(" ")
    if op not in OPERATORS:
        raise ValueError(f"target {bound!r}: expected '<op> <number>' with op one of {', '.join(OPERATORS)}")
    if not isinstance(value, (int, float)):
        return "-"
    return "yes" if OPERATORS[op](value, float(number)) else "no"


def rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows of one bench's summary: one per targeted key; one 'skipped' row for a bench that did not run."""
    name = str(summary.get("bench", "?"))
    if "skipped" in summary:
        return [(name, "skipped", str(summary["skipped"]), "", "", "", "")]
    targets = summary.get("target", {})
    if not isinstance(targets, dict):
        targets = {"ratio_vs_raw": f">= {targets}"}
    out = []
    for index, (key, bound) in enumerate(targets.items()):
        value = summary.get(key)
        spread = summary.get("spread") if index == 0 else None
        spread_text = f"{spread[0]:.3f}-{spread[1]:.3f}" if spread else "-"
        rounds = str(summary.get("rounds", "-")) if index == 0 else "-"
        quick = " (quick)" if summary.get("quick") and index == 0 else ""
        shown = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        out.append((name, key, shown + quick, spread_text, rounds, bound, met(value, bound)))
    return out


def render(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    table = [COLUMNS, *(row for summary in summaries for row in rows(summary))]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print(render([last_json(Path(arg)) for arg in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
