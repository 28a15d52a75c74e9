"""The funnel as people read it: `funnel.md` (table), `funnel.png` (bar chart) and length histograms of kept traces."""

from __future__ import annotations

import io
from array import array
from pathlib import Path
from typing import Any

from distill import files


def funnel_table(funnel: dict[str, Any]) -> list[str]:
    """The funnel as Markdown table lines, one row per step with its non-zero reasons (the demo report uses it)."""
    lines = ["| step | seen | kept | dropped | reasons |", "|---|---:|---:|---:|---|"]
    for step in funnel["steps"]:
        reasons = ", ".join(f"{r} {n}" for r, n in step["reasons"].items() if n) or "-"
        lines.append(f"| {step['name']} | {step['seen']} | {step['kept']} | {step['dropped']} | {reasons} |")
    return lines


def funnel_markdown(funnel: dict[str, Any]) -> str:
    header = [f"# Filter funnel: {funnel['in']} traces in, {funnel['out']} kept", ""]
    return "\n".join(header + funnel_table(funnel)) + "\n"


def _png(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with files.atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())


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
    _png(fig, path)
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
    _png(fig, path)
    plt.close(fig)
