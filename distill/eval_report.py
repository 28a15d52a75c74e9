"""What stage `eval` concludes from its scored models: paired differences, the spread over repeated runs, the
thinking-budget curve, and `results.md` / `budgets.png` that show them, each score with its interval.

Labels: `student`, `sft`, `base` are the models; a repeated run is `<label>@seed<S>`, a point of the budget curve
`<label>@think<B>` (`distill.evaluate` scores each into `models/<label>/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill import files, intervals

MODELS = ("student", "sft", "base")


def repeat_label(label: str, seed: int) -> str:
    return f"{label}@seed{seed}"


def budget_label(label: str, tokens: int) -> str:
    return f"{label}@think{tokens}"


def paired_differences(
    samples: dict[str, Path], problems: dict[str, list[str]], *, labels: list[str]
) -> dict[str, dict[str, Any]]:
    """`student - <other>` for every other model scored, per benchmark and overall, on the same problems.
    `samples` gives each label's samples.jsonl; `problems` the benchmarks' problem ids (unanswered ones count 0)."""
    rates = {label: intervals.pass_rates(samples[label], label, problems=problems) for label in labels}
    out = {}
    for other in labels[1:]:
        per_benchmark = {
            name: benchmark_difference(rates[labels[0]], rates[other], prefix=f"{name}/").as_dict()
            for name in problems
        }
        overall = intervals.paired(rates[labels[0]], rates[other])
        out[f"{labels[0]} - {other}"] = {"benchmarks": per_benchmark, "overall": overall.as_dict()}
    return out


def benchmark_difference(a: dict[str, float], b: dict[str, float], *, prefix: str) -> intervals.Estimate:
    """a - b, paired, over one benchmark's problems (rates keyed `benchmark/id`; `prefix` is `benchmark/`)."""
    return intervals.paired(
        {k: v for k, v in a.items() if k.startswith(prefix)}, {k: v for k, v in b.items() if k.startswith(prefix)}
    )


def repeat_spread(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """pass@1 of each run, overall and per benchmark, and their spread between runs."""
    return {
        "seeds": seeds,
        "overall": {"pass@1": [r["overall"]["pass@1"] for r in runs], **_spread(runs, None)},
        "benchmarks": {
            name: {"pass@1": [r["benchmarks"][name]["pass@1"] for r in runs], **_spread(runs, name)}
            for name in runs[0]["benchmarks"]
        },
    }


def _spread(runs: list[dict[str, Any]], name: str | None) -> dict[str, float]:
    return intervals.spread([(r["overall"] if name is None else r["benchmarks"][name])["pass@1"] for r in runs])


def budget_curve(full: dict[str, Any], points: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Overall pass@1 against mean thinking tokens, one point per budget, then the unbudgeted run (`budget` None)."""
    curve = []
    for tokens, scored in [*sorted(points.items()), (None, full)]:
        overall = scored["overall"]
        used = [overall["tokens"][kind] for kind in ("correct", "wrong")]
        samples = sum(u["samples"] for u in used)
        mean = sum((u["mean"] or 0) * u["samples"] for u in used) / samples if samples else 0.0
        curve.append(
            {
                "budget": tokens,
                "pass@1": overall["pass@1"],
                "interval": overall["interval"],
                "thinking_tokens_mean": mean,
                "cut_by_max_tokens": overall["tokens"]["cut_by_max_tokens"],
            }
        )
    return curve


def budget_chart(budgets: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Accuracy against the mean thinking tokens used, one line per model, error bars the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, curve in budgets.items():
        x = [point["thinking_tokens_mean"] for point in curve]
        y = [100 * point["pass@1"] for point in curve]
        low = [100 * (p["pass@1"] - p["interval"]["low"]) for p in curve]
        high = [100 * (p["interval"]["high"] - p["pass@1"]) for p in curve]
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=label)
        for point, xi, yi in zip(curve, x, y, strict=True):
            ax.annotate(str(point["budget"] or "none"), (xi, yi), textcoords="offset points", xytext=(4, -10))
    ax.set(xlabel="mean thinking tokens per sample", ylabel="pass@1 (%)", title="accuracy vs thinking budget")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    files.write_png(fig, path)
    plt.close(fig)


def results_table(results: dict[str, Any]) -> str:
    """Markdown: per model and benchmark (then per domain when there are several, then overall) every score, pass@1
    with its interval, and token use; then the paired differences, the spread over repeats and the budget curve."""
    labels = [label for label in MODELS if label in results]
    keys = sorted({k for label in labels for k in results[label]["overall"] if "@" in k})
    lines = [
        f"k = {results['k']} samples per problem; scores in %. Intervals: {intervals.METHOD}.",
        "Thinking tokens: mean (median) of correct / of wrong samples; cut: the share stopped by max_tokens.",
        "",
        "| model | benchmark | domain | problems | "
        + " | ".join(keys)
        + " | pass@1 95% interval | thinking tokens, correct | wrong | cut |",
        "|---|---|---|---|" + "---|" * len(keys) + "---|---|---|---|",
    ]
    for label in labels:
        scored = results[label]
        rows = [(name, scores["kind"], scores) for name, scores in scored["benchmarks"].items()]
        if len(scored.get("domains", {})) > 1:
            rows += [(f"all {kind}", kind, scores) for kind, scores in scored["domains"].items()]
        rows.append(("overall", "all", scored["overall"]))
        for name, kind, scores in rows:
            cells = " | ".join(f"{100 * scores[k]:.1f}" for k in keys)
            used = scores["tokens"]
            lines.append(
                f"| {label} (`{Path(scored['model']).name}`) | {name} | {kind} | {scores['problems']} | {cells} | "
                f"{_span(scores['interval'])} | {_tokens(used['correct'])} | {_tokens(used['wrong'])} | "
                f"{100 * used['cut_by_max_tokens']:.1f} |"
            )
    lines += _paired_lines(results.get("paired", {}))
    lines += _repeat_lines(results.get("repeats", {}))
    lines += _budget_lines(results.get("budgets", {}))
    lines += _record_lines(results, labels)
    return "\n".join(lines) + "\n"


def _paired_lines(paired: dict[str, Any]) -> list[str]:
    if not paired:
        return []
    lines = ["", "Paired differences (the same problems, problem by problem), in points:", ""]
    lines += ["| difference | benchmark | problems | mean (95% interval) | excludes zero |", "|---|---|---|---|---|"]
    for name, block in paired.items():
        for benchmark, diff in [*block["benchmarks"].items(), ("overall", block["overall"])]:
            excludes = intervals.Estimate(**diff).excludes_zero()
            lines.append(
                f"| {name} | {benchmark} | {diff['problems']} | {intervals.percent(diff, signed=True)} | "
                f"{'yes' if excludes else 'no'} |"
            )
    return lines


def _repeat_lines(repeats: dict[str, Any]) -> list[str]:
    if not repeats:
        return []
    lines = ["", "Repeated runs (engine seeds), overall pass@1 in %: each run, and the spread between runs:", ""]
    lines += ["| model | seeds | pass@1 per run | mean | sd | min–max |", "|---|---|---|---|---|---|"]
    for label, block in repeats.items():
        spread = block["overall"]
        runs = ", ".join(f"{100 * v:.1f}" for v in spread["pass@1"])
        lines.append(
            f"| {label} | {', '.join(map(str, block['seeds']))} | {runs} | {100 * spread['mean']:.1f} | "
            f"{100 * spread['sd']:.1f} | {100 * spread['min']:.1f}–{100 * spread['max']:.1f} |"
        )
    return lines


def _budget_lines(budgets: dict[str, Any]) -> list[str]:
    if not budgets:
        return []
    intro = ["", "Thinking budget (s1 budget forcing; `none`: unbudgeted), overall ([chart](budgets.png)):", ""]
    return intro + budget_table(budgets)


def budget_table(budgets: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The budget curves as Markdown rows (results.md and the demo report)."""
    lines = ["| model | budget | pass@1 (95% interval) | mean thinking tokens | cut by max_tokens |"]
    lines.append("|---|---|---|---|---|")
    for label, curve in budgets.items():
        for point in curve:
            lines.append(
                f"| {label} | {point['budget'] or 'none'} | {intervals.percent(point['interval'])} | "
                f"{point['thinking_tokens_mean']:.1f} | {100 * point['cut_by_max_tokens']:.1f}% |"
            )
    return lines


def _record_lines(results: dict[str, Any], labels: list[str]) -> list[str]:
    """A line per model on what could move its score: the engine seed above all (unset: not repeatable)."""
    lines = ["", "Settings behind the samples (all of them: `record` in results.json):", ""]
    for label in labels:
        record = results[label].get("record", {})
        engine = record.get("engine") or {}
        seed = engine.get("seed")
        repeatable = "" if seed is not None else " (no engine seed: samples are not repeatable)"
        versions = ", ".join(f"{k} {v}" for k, v in sorted(record.get("versions", {}).items()))
        settings = ", ".join(f"{k}={v}" for k, v in engine.items() if k != "seed")
        lines.append(f"- {label}: seed {seed}{repeatable}; {settings or record.get('backend')}; {versions}")
    return lines


def _span(estimate: dict[str, Any]) -> str:
    return f"{100 * estimate['low']:.1f}–{100 * estimate['high']:.1f}"


def _tokens(summary: dict[str, Any]) -> str:
    if not summary["samples"]:
        return "–"
    return f"{summary['mean']:.0f} ({summary['median']:.0f})"
