"""Filter stage: verify, clean, deduplicate and decontaminate teacher traces, counting why each one was dropped.

    distill filter recipes/demo.yaml

Reads every `*.jsonl` of the generate stage (sorted; one `Trace` per line) in two streaming passes:

1. each trace goes through the problem-level steps (decontaminate, exact_dedup, near_dedup; in this process), then
   the per-trace steps (truncated ... answer_matches) in a pool of worker processes with a hard timeout per trace;
   survivors are spilled to a temp file and per-problem counts are kept;
2. the survivors go through the per-problem steps (pass_rate_band, selection) and are written to `kept.jsonl`.

Outputs in the stage directory: `kept.jsonl` (Trace fields + `verdict` + `messages`, SFT-ready), `rejected.jsonl`
(Trace fields + `verdict` {correct, reason} + `step`), `funnel.json`/`funnel.md`/`funnel.png` (every input trace is
either kept or dropped by exactly one step, so the counts add up to the input), `lengths.png`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from distill import files
from distill.errors import DataError, DistillError
from distill.filter import report
from distill.filter.pool import VerifyPool
from distill.filter.problems import problem_steps
from distill.filter.progress import records_progress
from distill.filter.selection import ProblemStats, selection_steps
from distill.filter.steps import AnswerMatches, Funnel, Step, assistant_text, run_steps, trace_steps
from distill.pipeline import StageContext, StageReport
from distill.records import THINK_CLOSE, Trace
from distill.schema import Recipe

log = logging.getLogger(__name__)
MAX_GROUP = 64  # traces per worker task (one problem's consecutive samples, at most this many)
ITEM_FIELDS = ("kind", "answer", "choices", "tests", "problem", "reasoning", "final", "finish_reason")


def input_files(folder: Path) -> list[Path]:
    paths = sorted(p for p in Path(folder).glob("*.jsonl") if files.TMP_MARK not in p.name)
    if not paths:
        raise DataError(f"{folder}: no *.jsonl trace files (expected traces.jsonl or shard-*.jsonl)")
    return paths


def read_traces(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Stream trace rows, checking each against the `Trace` contract (the error names file and record)."""
    for path in paths:
        for number, row in enumerate(files.read_jsonl(path), start=1):
            try:
                Trace.from_dict(row, where=f"{path} record {number}")
            except ValueError as exc:
                raise DataError(str(exc)) from None
            yield row


def worker_item(row: dict[str, Any]) -> dict[str, Any]:
    """What a worker needs of a trace (not the prompt, sampling or full completion: less to pickle)."""
    return {**{k: row.get(k) for k in ITEM_FIELDS}, "has_close": THINK_CLOSE in row["completion"]}


@dataclass
class FilterPlan:
    """The steps of one filter run, in funnel order, and the per-problem counts the selection steps read."""

    problem: list[Step]  # decontaminate, exact_dedup, near_dedup (this process)
    trace: list[Step]  # truncated ... answer_matches (worker processes)
    chosen: list[Step]  # pass_rate_band, selection (second pass)
    stats: ProblemStats
    funnel: Funnel
    breakdown: report.Breakdown

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> FilterPlan:
        config = recipe.filter
        stats = ProblemStats(rule=config.selection, k=config.max_per_problem, longest_share=config.longest_share)
        problem = problem_steps(config)
        # No student only without `max_tokens` (a schema rule), so the empty name is never loaded.
        trace = trace_steps(config, student_model=recipe.student.model if recipe.student else "")
        chosen = selection_steps(config, stats)
        return cls(problem, trace, chosen, stats, Funnel([*problem, *trace, *chosen]), report.Breakdown())


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    config = recipe.filter
    paths = input_files(ctx.inputs["generate"])
    plan = FilterPlan.from_recipe(recipe)
    workers = config.workers or os.cpu_count() or 1
    log.info(
        "filter: %d trace file(s) in %s; steps %s; %d workers, %.1fs per check",
        len(paths),
        ctx.inputs["generate"],
        " → ".join(plan.funnel.names),
        workers,
        config.verify_timeout_s,
    )
    for stale in ctx.work_dir.glob(f".candidates{files.TMP_MARK}*"):  # left by a killed run in this work dir
        stale.unlink()
    candidates = ctx.work_dir / f".candidates{files.TMP_MARK}{os.getpid()}.jsonl"
    try:
        with files.atomic_open(ctx.work_dir / "rejected.jsonl") as rejected:
            with (
                candidates.open("w", encoding="utf-8") as spill,
                VerifyPool(steps=plan.trace, workers=workers, timeout_s=config.verify_timeout_s) as pool,
            ):
                extra = _first_pass(
                    read_traces(paths), plan, pool=pool, rejected=rejected, spill=spill, progress=ctx.options.progress
                )
            extra.update(workers=workers, workers_replaced=pool.killed, worker_cpu_s=round(pool.worker_cpu_s, 2))
            with files.atomic_open(ctx.work_dir / "kept.jsonl") as kept:
                n_out, tokens, chars = _second_pass(candidates, plan, kept=kept, rejected=rejected)
    finally:
        candidates.unlink(missing_ok=True)
    n_in = extra.pop("in")
    summary = {**plan.funnel.to_dict(n_in=n_in, n_out=n_out), **plan.breakdown.to_dict()}
    summary["yield"] = extra["yield"] = plan.breakdown.yield_(n_out)
    if sum(summary["dropped"].values()) + n_out != n_in:
        raise DistillError(f"filter funnel does not add up: {n_in} in, {n_out} kept, {summary['dropped']} dropped")
    if warning := report.length_warning(summary, max_share=config.warn_too_long_share):
        log.warning("filter: %s", warning)
        summary["warnings"] = extra["warnings"] = [warning]
    if sandbox := plan.trace[-1].isolation:  # set when code ran: named in funnel.md, the manifest and the card
        summary["sandbox"] = extra["sandbox"] = sandbox
    _write_reports(ctx.work_dir, summary, tokens, chars)
    for step in summary["steps"]:
        log.info(
            "filter %-17s seen %8d kept %8d dropped %8d", step["name"], step["seen"], step["kept"], step["dropped"]
        )
    return StageReport(counts={"in": n_in, "out": n_out, "dropped": summary["dropped"]}, extra=extra)


def _groups(rows: Iterator[dict[str, Any]], plan: FilterPlan, *, rejected: IO[str]) -> Iterator[list[dict[str, Any]]]:
    """Rows that pass the problem-level steps, grouped by consecutive problem id (dropped rows are written here)."""
    group: list[dict[str, Any]] = []
    for row in rows:
        plan.breakdown.seen(row)
        dropped = run_steps(row, plan.problem, plan.funnel)
        if dropped is not None:
            _reject(rejected, row, plan, step=dropped[0].name, reason=dropped[1], correct=None)
            continue
        if group and (group[-1]["id"] != row["id"] or len(group) >= MAX_GROUP):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _first_pass(
    rows: Iterator[dict[str, Any]],
    plan: FilterPlan,
    *,
    pool: VerifyPool,
    rejected: IO[str],
    spill: IO[str],
    progress: bool,
) -> dict[str, Any]:
    """Problem-level steps here, per-trace steps in the pool; survivors go to `spill` with their verdict.
    Returns the input count and the pass's numbers for the stage report."""
    in_flight: deque[list[dict[str, Any]]] = deque()

    def tasks() -> Iterator[list[dict[str, Any]]]:
        for group in _groups(rows, plan, rejected=rejected):
            in_flight.append(group)
            yield [worker_item(row) for row in group]

    seq, start = 0, time.monotonic()
    with records_progress("filter: verify", enabled=progress) as advance:
        for outcomes in pool.imap(tasks()):
            group = in_flight.popleft()
            for row, (failed, reason) in zip(group, outcomes, strict=True):
                _judged(row, failed, reason, plan, seq=seq, rejected=rejected, spill=spill)
                seq += 1
            advance(len(group))
    kinds = plan.breakdown.kinds()
    n_in = sum(kinds.values())
    return {"in": n_in, "kinds": kinds, "verify_records_per_s": round(n_in / (time.monotonic() - start), 1)}


def _judged(
    row: dict[str, Any],
    failed: int | None,
    reason: str,
    plan: FilterPlan,
    *,
    seq: int,
    rejected: IO[str],
    spill: IO[str],
) -> None:
    """Count one worker outcome and route the row: rejected, or spilled as a candidate for selection."""
    plan.funnel.replay(plan.trace, failed, reason)
    plan.stats.observe(row, seq=seq, correct=failed is None and reason == "ok", candidate=failed is None)
    if failed is not None:
        answer_step = isinstance(plan.trace[failed], AnswerMatches)
        correct = False if answer_step else None
        _reject(rejected, row, plan, step=plan.trace[failed].name, reason=reason, correct=correct)
        return
    verdict = {"correct": True if reason == "ok" else None, "reason": reason}
    spill.write(json.dumps({**row, "verdict": verdict, "_seq": seq}, ensure_ascii=False) + "\n")


def _second_pass(candidates: Path, plan: FilterPlan, *, kept: IO[str], rejected: IO[str]) -> tuple[int, array, array]:
    """Per-problem steps over the spilled candidates; the survivors become SFT rows in `kept`."""
    n_out, tokens, chars = 0, array("I"), array("I")
    for row in files.read_jsonl(candidates):
        dropped = run_steps(row, plan.chosen, plan.funnel)
        del row["_seq"]
        if dropped is not None:
            _reject(rejected, row, plan, step=dropped[0].name, reason=dropped[1], correct=row["verdict"]["correct"])
            continue
        plan.breakdown.kept(row)
        row["messages"] = [*row["prompt"], {"role": "assistant", "content": assistant_text(row)}]
        kept.write(json.dumps(row, ensure_ascii=False) + "\n")
        n_out += 1
        tokens.append(int(row.get("completion_tokens") or 0))
        chars.append(len(row["reasoning"]))
    return n_out, tokens, chars


def _reject(
    handle: IO[str], row: dict[str, Any], plan: FilterPlan, *, step: str, reason: str, correct: bool | None
) -> None:
    plan.breakdown.dropped(row, reason)
    out = {**row, "verdict": {"correct": correct, "reason": reason}, "step": step}
    handle.write(json.dumps(out, ensure_ascii=False) + "\n")


def _write_reports(work_dir: Path, summary: dict[str, Any], tokens: array, chars: array) -> None:
    files.write_json(work_dir / "funnel.json", summary)
    files.write_text(work_dir / "funnel.md", report.funnel_markdown(summary))
    report.funnel_chart(summary, work_dir / "funnel.png")
    report.length_histograms(tokens, chars, work_dir / "lengths.png")
