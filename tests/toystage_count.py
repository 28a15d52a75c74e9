"""Downstream toy stage: counts the upstream rows (see toystage.py)."""

from __future__ import annotations

import os
import time

from distill import files
from distill.errors import DistillError
from distill.pipeline import StageReport


def run(recipe, *, ctx) -> StageReport:
    rows = list(files.read_jsonl(ctx.inputs["make"] / "rows.jsonl"))
    if os.environ.get("TOY_HANG_RECIPE") == recipe.name:  # for the sweep's kill test: this variant never finishes
        print("HANGING", flush=True)
        time.sleep(600)
    if os.environ.get("TOY_FAIL_RECIPE") == recipe.name:
        raise DistillError(f"toy count: told to fail for {recipe.name}")
    files.write_json(ctx.work_dir / "count.json", {"rows": len(rows), "dedup": recipe.filter.dedup})
    return StageReport(counts={"in": len(rows), "out": 1, "dropped": {}})
