"""`runs/<sweep>/report.md`, `results.json` and one chart per benchmark, read back from the variants' stage folders.

Nothing here runs a stage: counts and wall times come from the manifests, scores and intervals from each variant's
`eval/results.json` (its `student` label: the model the variant's eval scored), and the paired differences from the
per-problem pass rates in the variants' `eval/samples.jsonl`, so the report can be rewritten at any time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from distill import eval_report, files, intervals, pipeline
from distill.manifest import read_manifest
from distill.sweep import Sweep

LABEL = "student"  # the model each variant's eval stage scored (its student, or `eval.model`)


def collect(sweep: Sweep, *, runs_dir: Path, failed: dict[str, str]) -> dict[str, Any]:
    """The sweep's results: per variant its overrides, stage costs (or who it shared them with), counts and scores;
    the paired differences against the baseline."""
    sweep_dir = runs_dir / sweep.name
    rows = {v.name: _variant(sweep_dir, v.name, v.overrides, failed.get(v.name)) for v in sweep.variants}
    return {
        "sweep": sweep.name,
        "recipe": str(sweep.base),
        "common_overrides": list(sweep.common),
        "baseline": sweep.baseline,
        "interval_method": intervals.METHOD,
        "variants": rows,
        "paired": _paired(sweep_dir, rows, sweep.baseline),
    }


def _variant(sweep_dir: Path, name: str, overrides: tuple[str, ...], error: str | None) -> dict[str, Any]:
    run_dir = sweep_dir / name
    stages = {}
    for stage in pipeline.STAGES:
        manifest = read_manifest(run_dir / stage)
        if manifest is not None:
            shared = manifest.recipe if manifest.recipe != name else None
            stages[stage] = {"wall_s": manifest.wall_s, "shared_with": shared, "counts": manifest.counts}
    generate = read_manifest(run_dir / "generate")
    finished = read_manifest(run_dir / "eval") is not None
    results = files.read_json(run_dir / "eval" / "results.json")[LABEL] if finished else None
    return {
        "overrides": list(overrides),
        "status": "failed" if error else ("done" if results else "incomplete"),
        "error": error,
        "stages": stages,
        "kept_traces": stages.get("filter", {}).get("counts", {}).get("out"),
        "train_rows": stages.get("train", {}).get("counts", {}).get("out"),
        "teacher_tokens": generate.extra.get("generated_tokens") if generate else None,
        "own_wall_s": round(sum(s["wall_s"] for s in stages.values() if s["shared_with"] is None), 1),
        "eval": None if results is None else {"overall": results["overall"], "benchmarks": results["benchmarks"]},
    }


def _paired(sweep_dir: Path, rows: dict[str, Any], baseline: str) -> dict[str, Any]:
    """`<variant> - <baseline>` per benchmark and overall, over the problems both scored, for every scored variant."""
    if rows[baseline]["eval"] is None:
        return {}
    rates = {
        name: intervals.pass_rates(sweep_dir / name / "eval" / "samples.jsonl", LABEL)
        for name, row in rows.items()
        if row["eval"] is not None
    }
    out = {}
    for name in rates:
        if name == baseline:
            continue
        per_benchmark = {}
        for benchmark in rows[name]["eval"]["benchmarks"]:
            if benchmark in rows[baseline]["eval"]["benchmarks"]:
                difference = eval_report.benchmark_difference(rates[name], rates[baseline], prefix=f"{benchmark}/")
                per_benchmark[benchmark] = difference.as_dict()
        if rates[name].keys() & rates[baseline].keys():
            overall = intervals.paired(rates[name], rates[baseline]).as_dict()
            out[f"{name} - {baseline}"] = {"overall": overall, "benchmarks": per_benchmark}
    return out


def write(sweep: Sweep, *, runs_dir: Path, failed: dict[str, str], elapsed_s: float | None = None) -> Path:
    """Write results.json, report.md and `pass1-<benchmark>.png` into runs/<sweep>/; returns the report's path."""
    sweep_dir = runs_dir / sweep.name
    results = collect(sweep, runs_dir=runs_dir, failed=failed)
    if elapsed_s is not None:
        results["elapsed_s"] = round(elapsed_s, 1)
    files.write_json(sweep_dir / "results.json", results)
    charts = _charts(results, sweep_dir)
    path = sweep_dir / "report.md"
    files.write_text(path, "\n".join(_markdown(results, charts)).rstrip("\n") + "\n")
    return path


def _markdown(results: dict[str, Any], charts: list[Path]) -> list[str]:
    rows = results["variants"]
    common = ", ".join(f"`{o}`" for o in results["common_overrides"]) or "none"
    lines = [
        f"# Sweep {results['sweep']}",
        "",
        f"Base recipe `{results['recipe']}`; overrides for every variant: {common}. Baseline: "
        f"`{results['baseline']}`. pass@1 in %, {results['interval_method']}.",
    ]
    if "elapsed_s" in results:
        lines[-1] += f" Wall time of this sweep command: {results['elapsed_s']:.0f} s."
    benchmarks = sorted({b for row in rows.values() if row["eval"] for b in row["eval"]["benchmarks"]})
    lines += [
        "",
        "| variant | overrides | kept traces | train rows | teacher tokens | pass@1 (95% interval) "
        f"| problems × samples |{''.join(f' {b} |' for b in benchmarks) if len(benchmarks) > 1 else ''}",
        "|---|---|---|---|---|---|---|" + "---|" * (len(benchmarks) if len(benchmarks) > 1 else 0),
    ]
    for name, row in rows.items():
        scored = row["eval"]
        overall = scored["overall"] if scored else None
        cells = [
            f"**{name}**" if name == results["baseline"] else name,
            ", ".join(f"`{o}`" for o in row["overrides"]) or "–",
            _int(row["kept_traces"]),
            _int(row["train_rows"]),
            _int(row["teacher_tokens"]),
            intervals.percent(overall["interval"]) if overall else row["status"],
            f"{overall['problems']} × {overall['samples']}" if overall else "–",
        ]
        if len(benchmarks) > 1:
            cells += [intervals.percent(scored["benchmarks"][b]["interval"]) if scored else "–" for b in benchmarks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _paired_lines(results["paired"])
    lines += _stage_lines(rows)
    failed = {name: row["error"] for name, row in rows.items() if row["error"]}
    if failed:
        lines += ["", "## Failed variants", ""] + [f"- {name}: {error}" for name, error in failed.items()]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in charts)]
    return lines


def _paired_lines(paired: dict[str, Any]) -> list[str]:
    if not paired:
        return []
    lines = [
        "",
        "## Paired differences against the baseline",
        "",
        "Per-problem pass rates of each variant minus the baseline's, on the problems both scored (points, 95%).",
        "",
        "| difference | overall | excludes 0 | per benchmark |",
        "|---|---|---|---|",
    ]
    for name, block in paired.items():
        overall = intervals.Estimate(**block["overall"])
        per = "; ".join(f"{b}: {intervals.percent(e, signed=True)}" for b, e in block["benchmarks"].items())
        lines.append(
            f"| {name} | {intervals.percent(overall, signed=True)} | {'yes' if overall.excludes_zero() else 'no'} "
            f"| {per} |"
        )
    return lines


def _stage_lines(rows: dict[str, Any]) -> list[str]:
    """Seconds per stage, or the variant whose output was linked in; a variant's own total last."""
    stages = [s for s in pipeline.STAGES if any(s in row["stages"] for row in rows.values())]
    if not stages:
        return []
    lines = [
        "",
        "## Cost per stage",
        "",
        "Seconds of each stage's run, or the variant that ran it (the output was linked in, not recomputed).",
        "",
        "| variant | " + " | ".join(stages) + " | own seconds |",
        "|---|" + "---|" * (len(stages) + 1),
    ]
    for name, row in rows.items():
        cells = []
        for stage in stages:
            entry = row["stages"].get(stage)
            if entry is None:
                cells.append("–")
            elif entry["shared_with"]:
                cells.append(f"shared with {entry['shared_with']}")
            else:
                cells.append(f"{entry['wall_s']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['own_wall_s']:.1f} |")
    return lines


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _charts(results: dict[str, Any], sweep_dir: Path) -> list[Path]:
    """One bar chart per benchmark: each scored variant's pass@1 with its 95% interval as an error bar."""
    scored = {name: row["eval"] for name, row in results["variants"].items() if row["eval"]}
    benchmarks = sorted({b for block in scored.values() for b in block["benchmarks"]})
    if not benchmarks:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    for benchmark in benchmarks:
        names = [n for n, block in scored.items() if benchmark in block["benchmarks"]]
        estimates = [scored[n]["benchmarks"][benchmark]["interval"] for n in names]
        values = [100 * e["mean"] for e in estimates]
        below = [100 * (e["mean"] - e["low"]) for e in estimates]
        errors = [below, [100 * (e["high"] - e["mean"]) for e in estimates]]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1), 3.6))
        colors = ["#3b6ea5" if n == results["baseline"] else "#7f9fbf" for n in names]
        bars = ax.bar(range(len(names)), values, color=colors, yerr=errors, capsize=3, ecolor="#333333")
        ax.bar_label(bars, fmt="%.1f", padding=2)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_ylabel("pass@1 (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{results['sweep']}: {benchmark} (95% intervals)")
        path = sweep_dir / f"pass1-{re.sub(r'[^A-Za-z0-9._-]+', '-', benchmark)}.png"
        files.write_png(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths
