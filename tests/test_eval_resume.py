"""Stage `eval` with several models: a model that fails ends the stage naming it, the finished models' results stay
in the work directory, and the rerun scores only the rest (real vLLM, tiny models)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

from conftest import TINY_ENGINE
from distill import files, pipeline
from distill.errors import DistillError
from distill.recipe import load_recipe

OPTS = pipeline.StageOptions(progress=False)


@pytest.mark.slow
def test_eval_rerun_after_a_failed_model_reuses_the_finished_ones(tmp_path, tiny_model, shared_data, caplog):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = (base / "config.json").read_text()
    (base / "config.json").write_text("{ not json")  # vLLM cannot load it: the second model's child fails
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "name": "ev",
                "data": {"spec": "local_jsonl", "path": "unused.jsonl"},
                "student": {"model": str(base)},
                "eval": {
                    "model": str(tiny_model),
                    "benchmarks": [{"spec": "math500", "path": str(shared_data / "math500/test.jsonl"), "limit": 2}],
                    "sampling": {"n": 2, "max_tokens": 8, "seed": 0},
                    "engine": TINY_ENGINE,
                    "compare_base": True,
                },
            }
        )
    )
    recipe = load_recipe(recipe_path)
    runs = tmp_path / "runs"
    with pytest.raises(DistillError) as failed:
        pipeline.run_stage(recipe, "eval", runs_dir=runs, options=OPTS)
    message = str(failed.value)
    assert f"scoring failed for base ({base}): exit code 1" in message
    assert "results are kept" in message and "(student)" in message and "rerun" in message
    (work,) = (runs / "ev" / ".work").glob("eval-*")
    assert (work / "models" / "student" / "scores.json").is_file(), "the student's results survive the failure"
    assert not (work / "models" / "base" / "scores.json").exists() and not (runs / "ev" / "eval").exists()
    student = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (work / "models/student").iterdir()}
    assert set(student) == {"samples.jsonl", "scores.json"}

    (base / "config.json").write_text(config)  # fixed in place: same recipe, same work directory
    caplog.set_level(logging.INFO, logger="distill.evaluate")
    pipeline.run_stage(recipe, "eval", runs_dir=runs, options=OPTS)
    assert f"student ({tiny_model}) already scored" in caplog.text and "reusing its results" in caplog.text
    assert "student scored" not in caplog.text and "base scored in this process" in caplog.text
    out = runs / "ev" / "eval"
    after = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (out / "models/student").iterdir()}
    assert after == student, "the student was not scored again: its files are the first run's, untouched"
    results = json.loads((out / "results.json").read_text())
    assert results["student"]["model"] == str(tiny_model) and results["base"]["model"] == str(base)
    assert results["benchmarks"] == results["student"]["benchmarks"]
    rows = list(files.read_jsonl(out / "samples.jsonl"))
    assert [row["model"] for row in rows] == ["student"] * 4 + ["base"] * 4, "2 models x 2 problems x k=2"
    assert "| base (`base`) | overall | all | 2 |" in (out / "results.md").read_text()
