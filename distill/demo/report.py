"""`runs/<name>/report.md` and its PNGs: the ablation table, the teacher, the funnel, trace lengths, wall times.

Everything is read back from finished stage directories (manifests, `results.json`, `funnel.json`, trace files), so
the report shows what the runs measured and can be rewritten at any time without running anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill import eval_report, files, intervals
from distill.errors import DistillError
from distill.filter.report import funnel_table
from distill.manifest import read_manifest
from distill.schema import Recipe

ROWS = (  # (row key, label): the order the table asks for
    ("untrained", "untrained"),
    ("answers", "SFT on answers only (no reasoning)"),
    ("unfiltered", "SFT on all teacher traces, unfiltered"),
    ("distill", "SFT on filtered traces (distill)"),
)
BUDGET_ROWS = (  # the on-policy comparison at an equal teacher budget (distill.demo.budget)
    ("few_sft", "SFT on the kept traces of the first problems only"),
    ("few", "the same student, then on-policy distillation"),
    ("more", "the same student, then SFT on more problems' traces"),
)
# Where each row was scored: (run, label in its eval), the run given by variant key ("main": the distill run).
SCORED = {
    "untrained": ("main", "base"),
    "distill": ("main", "student"),
    "few_sft": ("few", "sft"),
}


def scores(recipe: Recipe, variants: dict[str, Recipe], *, runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Overall held-out scores per row (and the teacher), from each run's eval `results.json`."""
    out = {}
    for key in (*(k for k, _ in ROWS), "teacher", *(k for k, _ in BUDGET_ROWS)):
        run_dir, label = _scored(recipe, variants, key, runs_dir=runs_dir)
        result = _results(run_dir)[label]
        rates = intervals.pass_rates(run_dir / "eval" / "samples.jsonl", label)
        out[key] = {
            "model": result["model"],
            **result["overall"],
            "rates": rates,
            "interval": intervals.Estimate(**result["overall"]["interval"]),
        }
    return out


def _scored(recipe: Recipe, variants: dict[str, Recipe], key: str, *, runs_dir: Path) -> tuple[Path, str]:
    run, label = SCORED.get(key, (key, "student"))
    return runs_dir / (recipe.name if run == "main" else variants[run].name), label


def write_report(
    recipe: Recipe,
    variants: dict[str, Recipe],
    *,
    runs_dir: Path,
    prepared: dict[str, Any],
    elapsed_s: float | None = None,
) -> Path:
    """Write report.md, accuracy.png and trace-lengths.png into runs/<name>/; returns the report path."""
    run_dir = runs_dir / recipe.name
    table = scores(recipe, variants, runs_dir=runs_dir)
    funnel = files.read_json(run_dir / "filter" / "funnel.json")
    rows = {
        key: _train_rows(runs_dir / (recipe.name if key == "distill" else variants[key].name))
        for key in ("answers", "unfiltered", "distill")
    }
    _accuracy_chart(table, run_dir / "accuracy.png")
    lengths = _trace_lengths(run_dir)
    _length_chart(lengths, run_dir / "trace-lengths.png")
    text = "\n".join(
        [
            *_headline(recipe, table, rows, prepared),
            *_teacher(table, funnel, recipe),
            *_thinking_budget(recipe, variants, runs_dir=runs_dir),
            *_budget(recipe, variants, table, runs_dir=runs_dir),
            *_funnel(funnel),
            *_lengths(lengths),
            *_walltimes(recipe, variants, runs_dir=runs_dir, prepared=prepared, elapsed_s=elapsed_s),
        ]
    )
    path = run_dir / "report.md"
    files.write_text(path, text.rstrip("\n") + "\n")
    return path


def _results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "eval" / "results.json"
    if not path.is_file():
        raise DistillError(f"{path}: not found; the eval stage of runs/{run_dir.name} has not finished")
    return files.read_json(path)


def _train_rows(run_dir: Path) -> int | None:
    manifest = read_manifest(run_dir / "train")
    return manifest.counts.get("out") if manifest else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _span(row: dict[str, Any]) -> str:
    return f"{100 * row['interval'].low:.1f}–{100 * row['interval'].high:.1f}"


def _token_use(row: dict[str, Any]) -> str:
    """Mean thinking tokens of correct / wrong samples and the share cut by max_tokens (`distill.eval_record`)."""
    used = row.get("tokens")
    if not used:
        return "–"
    means = [f"{used[kind]['mean']:.0f}" if used[kind]["samples"] else "–" for kind in ("correct", "wrong")]
    return f"{means[0]} / {means[1]} ({_pct(used['cut_by_max_tokens'])}%)"


def _headline(recipe: Recipe, table: dict[str, dict[str, Any]], rows: dict[str, Any], prepared: dict[str, Any]):
    k = next(iter(table.values()))["samples"]
    maj = f"maj@{k}"
    problems = table["distill"]["problems"]
    lines = [
        f"# Distillation demo: `{recipe.name}`",
        "",
        f"Held-out problems: {problems} (never seen by teacher or students), {k} samples each at temperature "
        f"{recipe.eval.sampling.get('temperature')}; accuracy = pass@1 (mean over samples), in %.",
        "",
        f"| student | accuracy (pass@1) | 95% interval | {maj} | thinking tokens: correct / wrong (cut) "
        "| training rows |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        lines.append(
            f"| {label} | {_pct(table[key]['pass@1'])} | {_span(table[key])} | {_pct(table[key].get(maj))} | "
            f"{_token_use(table[key])} | {rows.get(key) if rows.get(key) is not None else '–'} |"
        )
    others = max(table[key]["pass@1"] for key, _ in ROWS if key != "distill")
    margin = table["distill"]["pass@1"] - others
    verdict = (
        f"The distilled student is ahead of every other row: {100 * margin:+.1f} points over the next best."
        if margin > 0
        else f"The distilled student is NOT ahead: {100 * abs(margin):.1f} points behind the best other row."
    )
    lines += [
        "",
        verdict,
        "",
        "![held-out accuracy](accuracy.png)",
        "",
        "Intervals: 95% normal intervals over the held-out problems of each problem's pass rate (the mean over "
        "its samples), clipped to 0–100; the bars on the chart are these.",
        "",
    ]
    settings = prepared.get("settings", {})
    if settings:
        lines += [
            f"Teacher: Qwen2 hidden {settings['teacher_hidden']} x {settings['teacher_layers']} layers, trained "
            f"{settings['teacher_steps']} steps on {prepared['splits']['teacher_gold']} gold traces. Student: "
            f"hidden {settings['student_hidden']} x {settings['student_layers']} layers, random init, "
            f"{recipe.student.sft.get('max_steps', '?')} SFT steps for every trained row.",
            "",
        ]
    return lines


def _teacher(table: dict[str, dict[str, Any]], funnel: dict[str, Any], recipe: Recipe) -> list[str]:
    verify = next((s for s in funnel["steps"] if s["name"] == "answer_matches"), None)
    lines = [
        "## Teacher",
        "",
        f"- held-out accuracy (pass@1): {_pct(table['teacher']['pass@1'])}% (95% interval {_span(table['teacher'])})",
    ]
    if verify and verify["seen"]:
        share = verify["kept"] / verify["seen"]
        lines.append(
            f"- its traces on the distillation problems (temperature "
            f"{recipe.teacher.sampling.get('temperature')}): {verify['kept']} of {verify['seen']} verified "
            f"correct ({_pct(share)}%)"
        )
    return [*lines, ""]


def _thinking_budget(recipe: Recipe, variants: dict[str, Recipe], *, runs_dir: Path) -> list[str]:
    """The accuracy-vs-thinking-tokens curve of the distill student and the teacher (`eval.thinking_budgets`)."""
    curves = {
        name: _results(runs_dir / run).get("budgets", {}).get("student")
        for name, run in (("distill student", recipe.name), ("teacher", variants["teacher"].name))
    }
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        return []
    eval_report.budget_chart(curves, runs_dir / recipe.name / "thinking-budget.png")
    lines = [
        "## Thinking budget",
        "",
        "s1's budget forcing: each sample may think for at most B tokens; at B its `</think>` is forced and it "
        "writes its answer (vLLM continues the sample by token ids; nothing is cut from text). `none`: no budget.",
        "",
        *eval_report.budget_table(curves),
    ]
    return [*lines, "", "![accuracy vs thinking budget](thinking-budget.png)", ""]


def _budget(
    recipe: Recipe, variants: dict[str, Recipe], table: dict[str, dict[str, Any]], *, runs_dir: Path
) -> list[str]:
    """The on-policy rows: teacher tokens generated and scored, seconds, and the paired differences."""
    few, more = (runs_dir / variants[key].name for key in ("few", "more"))
    spent = {key: read_manifest(run / "filter").extra for key, run in (("few", few), ("more", more))}
    metrics = files.read_json(few / "onpolicy" / "metrics.json")
    tokens = metrics["teacher_tokens"]
    prompts = tokens["scored"] - (tokens["sampled_by_student"] or 0)
    seconds = {key: read_manifest(run / "train").wall_s for key, run in (("few", few), ("more", more))}
    onpolicy_s = read_manifest(few / "onpolicy").wall_s
    rows = {
        "few_sft": (spent["few"], 0, seconds["few"], "–"),
        "few": (spent["few"], tokens["sampled_by_student"], seconds["few"] + onpolicy_s, metrics["global_step"]),
        "more": (spent["more"], 0, seconds["few"] + seconds["more"], variants["more"].student.sft["max_steps"]),
    }
    lines = [
        "## On-policy distillation at an equal teacher budget",
        "",
        "On-policy distillation is sold on cost: the teacher scores the student's own samples in one forward pass "
        "instead of generating traces. So its row is compared with the same start given the same teacher tokens as "
        "more traces, SFT-continued for as many steps at the same learning rate (`distill/demo/budget.py`). Teacher "
        "tokens are completion tokens: generated for every sample of "
        f"the problems used, kept or not; scored: the student's samples (the teacher also read {prompts:,} prompt "
        "tokens of the on-policy row). Seconds are the train and onpolicy stages' own, the start's included.",
        "",
        "| student | problems | teacher tokens generated | scored | total | extra steps | pass@1 | 95% interval "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in BUDGET_ROWS:
        spend, scored, wall, steps = rows[key]
        generated = spend["teacher_generated_tokens"]
        lines.append(
            f"| {label} | {spend['problems']} | {generated:,} | {scored:,} | {generated + scored:,} | {steps} | "
            f"{_pct(table[key]['pass@1'])} | {_span(table[key])} | {wall:.0f} |"
        )
    lines.append("")
    for name, (a, b) in {
        "on-policy minus its SFT start": ("few", "few_sft"),
        "on-policy minus SFT at the same teacher tokens": ("few", "more"),
    }.items():
        difference = intervals.paired(table[a]["rates"], table[b]["rates"])
        verdict = "excludes zero" if difference.excludes_zero() else "includes zero: no difference shown"
        lines.append(
            f"- {name}: {intervals.percent(difference, signed=True)} points (95% interval, paired over "
            f"{difference.problems} problems; {verdict})"
        )
    return [*lines, ""]


def _funnel(funnel: dict[str, Any]) -> list[str]:
    lines = [
        "## Filter funnel",
        "",
        f"{funnel['in']} traces in, {funnel['out']} kept ([chart](filter/funnel.png), kept lengths: "
        "[filter/lengths.png](filter/lengths.png)).",
        "",
        *funnel_table(funnel),
    ]
    return [*lines, ""]


def _trace_lengths(run_dir: Path) -> dict[str, list[int]]:
    """Completion tokens of the teacher's traces: kept, and rejected (wrong or malformed)."""
    filter_dir = run_dir / "filter"
    return {
        "kept": [int(r.get("completion_tokens") or 0) for r in files.read_jsonl(filter_dir / "kept.jsonl")],
        "rejected": [int(r.get("completion_tokens") or 0) for r in files.read_jsonl(filter_dir / "rejected.jsonl")],
    }


def _lengths(lengths: dict[str, list[int]]) -> list[str]:
    lines = [
        "## Trace lengths",
        "",
        "![trace lengths](trace-lengths.png)",
        "",
        "| traces | n | mean tokens | max |",
        "|---|---:|---:|---:|",
    ]
    for key, values in lengths.items():
        mean = f"{sum(values) / len(values):.1f}" if values else "–"
        lines.append(f"| {key} | {len(values)} | {mean} | {max(values) if values else '–'} |")
    return [*lines, ""]


def _walltimes(
    recipe: Recipe, variants: dict[str, Recipe], *, runs_dir: Path, prepared: dict[str, Any], elapsed_s: float | None
) -> list[str]:
    lines = ["## Wall time", ""]
    if elapsed_s is not None:
        lines += [
            f"The command that wrote this report took {elapsed_s:.0f} s (stages it found finished took none; the "
            "ablation runs overlap the distill run, so the stage times below add up to more than that).",
            "",
        ]
    lines += ["| run | stage | seconds |", "|---|---|---:|"]
    total = 0.0
    for name, seconds in prepared.get("wall_s", {}).items():
        lines.append(f"| prepare | {name} | {seconds:.1f} |")
        total += seconds
    for run in (recipe, *variants.values()):
        for stage in ("generate", "filter", "train", "onpolicy", "eval", "push"):
            manifest = read_manifest(runs_dir / run.name / stage)
            if manifest is None or manifest.extra.get("transform") or (run is not recipe and stage == "generate"):
                continue  # copies and derived sets took no stage time
            lines.append(f"| {run.name} | {stage} | {manifest.wall_s:.1f} |")
            total += manifest.wall_s
    lines += [f"| **sum** | | **{total:.1f}** |", ""]
    return lines


def _accuracy_chart(table: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = [key for key, _ in ROWS] + ["teacher"] + [key for key, _ in BUDGET_ROWS]
    labels = [
        "untrained",
        "answers\nonly",
        "unfiltered",
        "distill",
        "teacher",
        "few\ntraces",
        "few +\non-policy",
        "same\nbudget",
    ]
    values = [100 * table[key]["pass@1"] for key in keys]
    errors = [
        [100 * (table[k]["pass@1"] - table[k]["interval"].low) for k in keys],
        [100 * (table[k]["interval"].high - table[k]["pass@1"]) for k in keys],
    ]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    colors = ["#999999", "#c98b3a", "#b5534b", "#4c8c4a", "#3b6ea5", "#8a8a5c", "#7b5ea7", "#4c8c4a"]
    bars = ax.bar(labels, values, color=colors, yerr=errors, capsize=3, ecolor="#333333")
    ax.bar_label(bars, fmt="%.1f", padding=2)
    ax.axvline(4.5, color="#cccccc", linewidth=1)  # the equal-budget comparison stands apart
    ax.set_ylabel("held-out pass@1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("held-out accuracy")
    files.write_png(fig, path)
    plt.close(fig)


def _length_chart(lengths: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = lengths["kept"] + lengths["rejected"]
    bins = range(min(values, default=0), max(values, default=0) + 2)  # one bar per token count
    for key, color in (("kept", "#4c8c4a"), ("rejected", "#b5534b")):
        if lengths[key]:
            ax.hist(lengths[key], bins=bins, alpha=0.7, color=color, label=f"{key} ({len(lengths[key])})")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("teacher traces")
    ax.legend()
    files.write_png(fig, path)
    plt.close(fig)
