"""Downstream toy stage: counts the upstream rows (see toystage.py)."""

from __future__ import annotations

from distill import files
from distill.pipeline import StageReport


def run(recipe, *, ctx) -> StageReport:
    rows = list(files.read_jsonl(ctx.inputs["make"] / "rows.jsonl"))
    files.write_json(ctx.work_dir / "count.json", {"rows": len(rows), "dedup": recipe.filter.dedup})
    return StageReport(counts={"in": len(rows), "out": 1, "dropped": {}})
