"""The funnel as people read it: `funnel.md` (table), `funnel.png` (bar chart) and length histograms of kept traces."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import files
from distill.filter.isolation import WEAKER


@dataclass
class Breakdown:
    """Traces in, kept and dropped (by reason) per data source, so a mixture's domains can be read apart."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: set[str] = field(default_factory=set)  # ids seen, for coverage
    covered: set[str] = field(default_factory=set)  # ids with at least one kept trace
    teacher_tokens: int = 0  # completion tokens of every trace in, kept or not: what the teacher was paid for

    def _row(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.rows.setdefault(
            record["source"], {"kind": record["kind"], "in": 0, "kept": 0, "dropped": Counter()}
        )

    def seen(self, record: dict[str, Any]) -> None:
        self._row(record)["in"] += 1
        self.problems.add(record["id"])
        self.teacher_tokens += int(record.get("completion_tokens") or 0)

    def kept(self, record: dict[str, Any]) -> None:
        self._row(record)["kept"] += 1
        self.covered.add(record["id"])

    def yield_(self, n_out: int) -> dict[str, Any]:
        """Coverage (share of problems with a kept trace) and teacher tokens per kept trace: what sampling bought."""
        problems = len(self.problems)
        return {
            "problems": problems,
            "problems_kept": len(self.covered),
            "coverage": round(len(self.covered) / problems, 4) if problems else 0.0,
            "teacher_tokens": self.teacher_tokens,
            "teacher_tokens_per_kept": round(self.teacher_tokens / n_out, 1) if n_out else None,
        }

    def dropped(self, record: dict[str, Any], reason: str) -> None:
        self._row(record)["dropped"][reason] += 1

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """The per-source rows summed per answer kind (domain)."""
        totals: dict[str, dict[str, Any]] = {}
        for row in self.rows.values():
            total = totals.setdefault(row["kind"], {"in": 0, "kept": 0, "dropped": Counter()})
            total["in"] += row["in"]
            total["kept"] += row["kept"]
            total["dropped"].update(row["dropped"])
        return totals

    def kinds(self) -> dict[str, int]:
        """Traces seen per answer kind."""
        return {kind: total["in"] for kind, total in self.by_kind().items()}

    def to_dict(self) -> dict[str, Any]:
        """`by_source` and `by_kind` (domain) tables of the funnel, each adding up to its `in`."""
        plain = {"by_source": self.rows, "by_kind": self.by_kind()}
        return {
            table: {name: {**row, "dropped": _by_count(row["dropped"])} for name, row in sorted(rows.items())}
            for table, rows in plain.items()
        }


def _by_count(reasons: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties by name: the same order on every run."""
    return dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0])))


def breakdown_table(funnel: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per source (then per domain when there are several) with its top drop reasons."""
    lines = ["| source | domain | traces in | kept | kept % | dropped by reason |", "|---|---|---:|---:|---:|---|"]
    rows = [(name, row["kind"], row) for name, row in funnel["by_source"].items()]
    if len(funnel["by_kind"]) > 1:
        rows += [(f"all {kind}", kind, row) for kind, row in funnel["by_kind"].items()]
    for name, kind, row in rows:
        share = 100 * row["kept"] / row["in"] if row["in"] else 0.0
        reasons = ", ".join(f"{reason} {n}" for reason, n in row["dropped"].items()) or "-"
        lines.append(f"| {name} | {kind} | {row['in']} | {row['kept']} | {share:.1f} | {reasons} |")
    return lines


def funnel_table(funnel: dict[str, Any]) -> list[str]:
    """The funnel as Markdown table lines, one row per step with its non-zero reasons (the demo report uses it)."""
    lines = ["| step | seen | kept | dropped | reasons |", "|---|---:|---:|---:|---|"]
    for step in funnel["steps"]:
        reasons = ", ".join(f"{r} {n}" for r, n in step["reasons"].items() if n) or "-"
        lines.append(f"| {step['name']} | {step['seen']} | {step['kept']} | {step['dropped']} | {reasons} |")
    return lines


def length_warning(funnel: dict[str, Any], *, max_share: float | None) -> str | None:
    """The warning when the length filter removes more than `max_share` of the traces that reach it: the long
    traces are the hard problems' ones, so a tight `filter.max_tokens` quietly leaves mostly easy problems."""
    step = next((s for s in funnel["steps"] if s["name"] == "too_long"), None)
    if max_share is None or step is None or not step["seen"] or step["dropped"] / step["seen"] <= max_share:
        return None
    return (
        f"filter.max_tokens removed {step['dropped']} of the {step['seen']} traces that reached it "
        f"({step['dropped'] / step['seen']:.0%}, more than filter.warn_too_long_share {max_share:.0%}): long traces "
        "are the hard problems' ones; extend the student's context (student.base_config) and raise "
        "filter.max_tokens and student.sft.max_length to keep them"
    )


def funnel_markdown(funnel: dict[str, Any]) -> str:
    header = [f"# Filter funnel: {funnel['in']} traces in, {funnel['out']} kept", ""]
    if got := funnel.get("yield"):
        per_kept = got["teacher_tokens_per_kept"]
        header += [
            f"Coverage {got['problems_kept']:,} of {got['problems']:,} problems ({got['coverage']:.1%}) have a kept "
            f"trace; teacher completion tokens {got['teacher_tokens']:,}, "
            + (f"{per_kept:,.1f} per kept trace." if per_kept is not None else "no trace kept."),
            "",
        ]
    for warning in funnel.get("warnings", []):
        header += [f"> **Warning:** {warning}", ""]
    if sandbox := funnel.get("sandbox"):
        weaker = WEAKER.get(sandbox)
        header += [f"> **Warning:** code ran under the weaker sandbox `{sandbox}`: {weaker}.", ""] if weaker else []
        header += [f"Code was verified under sandbox `{sandbox}`.", ""]
    by_source = ["", "## By source", "", *breakdown_table(funnel)] if funnel.get("by_source") else []
    return "\n".join(header + funnel_table(funnel) + by_source) + "\n"


def funnel_chart(funnel: dict[str, Any], path: Path) -> None:
    """Horizontal bars per step: kept, then one stacked segment per drop reason."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = funnel["steps"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(steps) + 1.5))
    names = [s["name"] for s in steps]
    ax.barh(names, [s["kept"] for s in steps], color="#b8b8b8", label="kept")
    left = [s["kept"] for s in steps]
    colors = plt.get_cmap("tab20").colors
    for index, reason in enumerate(sorted({r for s in steps for r, n in s["reasons"].items() if n})):
        widths = [s["reasons"].get(reason, 0) for s in steps]
        ax.barh(names, widths, left=left, label=reason, color=colors[index % len(colors)])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("traces")
    ax.set_title(f"filter funnel: {funnel['in']} in, {funnel['out']} kept")
    ax.legend(fontsize=7, loc="lower right")
    files.write_png(fig, path)
    plt.close(fig)


def length_histograms(tokens: array, chars: array, path: Path) -> None:
    """Completion tokens (teacher's count) and reasoning characters of the kept traces."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, label in ((axes[0], tokens, "completion tokens"), (axes[1], chars, "reasoning characters")):
        if len(values):
            ax.hist(values, bins=40, color="#3b6ea5")
        ax.set_xlabel(label)
        ax.set_ylabel("kept traces")
    fig.suptitle(f"lengths of {len(tokens)} kept traces")
    files.write_png(fig, path)
    plt.close(fig)
