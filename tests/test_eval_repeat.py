"""Stage `eval` with `repeat` and `thinking_budgets` (real vLLM on the tiny model): every repeated run and budget
point is its own scoring, the report gives the spread between runs and the budget curve, and a budget point's
samples never think past their budget."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY_ENGINE
from distill import files, pipeline
from distill.recipe import load_recipe

BUDGET = 4


@pytest.mark.slow
def test_eval_repeat_and_budget_curve(tmp_path, tiny_model):
    problems = tmp_path / "problems.jsonl"
    files.write_jsonl(
        problems, [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    )
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "rep",
                "data": {"spec": "local_jsonl", "path": "unused.jsonl"},
                "eval": {
                    "model": str(tiny_model),
                    "benchmarks": [{"spec": "local_jsonl", "path": str(problems)}],
                    "sampling": {"n": 2, "max_tokens": 12, "temperature": 1.0},
                    "engine": {**TINY_ENGINE, "seed": 7},
                    "repeat": 2,
                    "thinking_budgets": [BUDGET],
                },
            }
        )
    )
    recipe = load_recipe(path)
    manifest = pipeline.run_stage(
        recipe, "eval", runs_dir=tmp_path / "runs", options=pipeline.StageOptions(progress=False)
    )
    out = tmp_path / "runs" / "rep" / "eval"
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"student@seed8", f"student@think{BUDGET}"}
    assert results["runs"]["student@seed8"]["record"]["engine"]["seed"] == 8
    assert results["student"]["record"]["engine"]["seed"] == 7
    repeats = results["repeats"]["student"]
    assert repeats["seeds"] == [7, 8] and len(repeats["overall"]["pass@1"]) == 2 and repeats["overall"]["runs"] == 2
    rows = list(files.read_jsonl(out / "samples.jsonl"))
    assert manifest.counts["out"] == len(rows) == 3 * 3 * 2, "3 scorings x 3 problems x k=2"
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["model"], []).append(row["completion"])
    assert by_label["student"] != by_label["student@seed8"], "another engine seed draws other samples"
    budgeted = [row for row in rows if row["model"] == f"student@think{BUDGET}"]
    for row in budgeted:
        assert row["thinking_tokens"] <= BUDGET and "</think>" in row["completion"], row
    curve = results["budgets"]["student"]
    assert [point["budget"] for point in curve] == [BUDGET, None]
    assert curve[0]["thinking_tokens_mean"] <= BUDGET < curve[1]["thinking_tokens_mean"]
    assert (out / "budgets.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| student | 7, 8 |" in table and f"| student | {BUDGET} |" in table and "| student | none |" in table
    assert "seed 7;" in table, "the record's line names the engine seed"
    assert set(manifest.extra["reproducibility"]) == {"student", "student@seed8", f"student@think{BUDGET}"}
