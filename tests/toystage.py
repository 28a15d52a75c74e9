"""Two minimal stages for testing the runner's mechanics (skip, re-run, swap, kill safety) in isolation.

They follow the real stage contract (`run(recipe, *, ctx) -> StageReport`, `load(recipe)`,
`problems_hash(loaded)`); the library stages have their own end-to-end tests.
"""

from __future__ import annotations

import json
import os
import time

from distill import files
from distill.manifest import canonical_hash
from distill.pipeline import Stage, StageReport

STAGES = {
    "make": Stage("make", "toystage", ("data",), (), "filter", problems=True),
    "count": Stage("count", "toystage_count", ("filter.dedup",), ("make",), "filter"),
}


LOADS = []  # one entry per load: the runner must load a stage's problems once per run


def load(recipe):
    LOADS.append(recipe.data[0].path)
    return recipe.data[0].path


def problems_hash(path) -> str:
    return canonical_hash(files.sha256_file(path))


def run(recipe, *, ctx) -> StageReport:
    rows = list(files.read_jsonl(ctx.problems))
    limit = recipe.data[0].limit or len(rows)
    out = [{"problem": r["problem"].upper()} for r in rows[:limit]]
    if os.environ.get("TOY_HANG"):  # for the kill test: leave a partial file, then wait to be killed
        (ctx.work_dir / "rows.jsonl").write_text(json.dumps(out[0]) + "\n")
        print("HANGING", flush=True)
        time.sleep(600)
    files.write_jsonl(ctx.work_dir / "rows.jsonl", out)
    return StageReport(counts={"in": len(rows), "out": len(out), "dropped": {"over_limit": len(rows) - len(out)}})
