"""`distill sweep`: variants checked up front, equal stages run once and shared, resume after a kill, the report.

The runner's mechanics are tested on the two toy stages (tests/toystage.py); test_sweep_real.py runs a grid through
the real stages on tiny models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

import toystage
from conftest import REPO
from distill import cli, pipeline
from distill.errors import RecipeError
from distill.manifest import read_manifest
from distill.sweep import grid_variants, load_sweep, parse_grid, split_values


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A 5-row recipe with the runner's stage table swapped for the toy stages; cwd is tmp_path."""
    monkeypatch.setattr(pipeline, "STAGES", toystage.STAGES)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) + "\n" for i in range(5)))
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"name: toy\ndata: {{spec: local_jsonl, path: {data}}}\n")
    return tmp_path, recipe


GRID = ["--grid", "filter.dedup=true,false", "--grid", "filter.workers=1,2"]


def sweep(*args: str) -> int:
    return cli.main(["sweep", *args, "--no-progress"])


def test_values_split_on_top_level_commas_and_grid_names_are_folder_safe():
    assert split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert split_values("[1, 2],[3],'a,b'") == ["[1, 2]", "[3]", "'a,b'"]
    grid = parse_grid(["student.sft.learning_rate=1e-3,3e-3", "filter.selection=all_correct,shortest_correct"])
    assert grid_variants(grid) == {
        "learning_rate-1e-3_selection-all_correct": ["student.sft.learning_rate=1e-3", "filter.selection=all_correct"],
        "learning_rate-1e-3_selection-shortest_correct": [
            "student.sft.learning_rate=1e-3",
            "filter.selection=shortest_correct",
        ],
        "learning_rate-3e-3_selection-all_correct": ["student.sft.learning_rate=3e-3", "filter.selection=all_correct"],
        "learning_rate-3e-3_selection-shortest_correct": [
            "student.sft.learning_rate=3e-3",
            "filter.selection=shortest_correct",
        ],
    }
    assert list(grid_variants(parse_grid(["a.seed=1", "b.seed=[1, 2]"]))) == ["a.seed-1_b.seed-1-2"]
    with pytest.raises(RecipeError, match="expected KEY=V1,V2"):
        parse_grid(["student.sft.learning_rate"])


def test_a_2x2_grid_runs_each_distinct_stage_once_and_the_report_says_who_shared(toy, capsys):
    tmp, recipe = toy
    assert sweep(str(recipe), *GRID, "--name", "grid") == 0
    names = ["dedup-true_workers-1", "dedup-true_workers-2", "dedup-false_workers-1", "dedup-false_workers-2"]
    runs = tmp / "runs" / "grid"
    make = {name: read_manifest(runs / name / "make") for name in names}
    count = {name: read_manifest(runs / name / "count") for name in names}
    # `make` reads only `data`: one variant ran it, the other three hold links to its files
    assert {m.recipe for m in make.values()} == {names[0]}
    assert len({(m.output_hash, m.started_at) for m in make.values()}) == 1
    assert os.stat(runs / names[0] / "make/rows.jsonl").st_ino == os.stat(runs / names[3] / "make/rows.jsonl").st_ino
    # `count` reads `filter.dedup`: one run per value, `workers` does not split it
    assert {n: m.recipe for n, m in count.items()} == {
        names[0]: names[0],
        names[1]: names[0],
        names[2]: names[2],
        names[3]: names[2],
    }
    assert json.loads((runs / names[3] / "count/count.json").read_text()) == {"rows": 5, "dedup": False}
    results = json.loads((runs / "results.json").read_text())
    assert results["baseline"] == names[0]
    assert results["variants"][names[1]]["stages"]["count"]["shared_with"] == names[0]
    assert results["variants"][names[0]]["stages"]["count"]["shared_with"] is None
    assert results["variants"][names[3]]["overrides"] == ["filter.dedup=false", "filter.workers=2"]
    report = (runs / "report.md").read_text()
    assert report == capsys.readouterr().out.rstrip("\n") + "\n"
    assert f"| {names[3]} | shared with {names[0]} | shared with {names[2]} |" in report
    # every variant is a recipe of its own: `distill status` reads it
    variant = tmp / "runs/grid/recipes" / f"{names[2]}.yaml"
    rows = pipeline.status(load_sweep(recipe, grid=GRID[1::2]).variant(names[2]).recipe, runs_dir=runs)
    assert [r["state"] for r in rows] == ["done", "done"] and variant.is_file()
    assert yaml.safe_load(variant.read_text())["name"] == names[2]


def test_a_second_sweep_run_is_cached(toy):
    tmp, recipe = toy
    assert sweep(str(recipe), *GRID, "--name", "grid") == 0
    runs = tmp / "runs" / "grid"
    before = {p: p.read_text() for p in runs.glob("*/*/manifest.json")}
    assert sweep(str(recipe), *GRID, "--name", "grid") == 0
    assert {p: p.read_text() for p in runs.glob("*/*/manifest.json")} == before and len(before) == 8


def test_every_bad_variant_is_reported_by_name_before_anything_runs(toy, capsys):
    tmp, recipe = toy
    sweep_file = tmp / "bad.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "sweep": {
                    "recipe": str(recipe),
                    "variants": {
                        "good": ["filter.dedup=false"],
                        "typo": ["filter.dedupe=false"],
                        "wrong-type": ["filter.workers=many"],
                    },
                    "baseline": "missing",
                }
            }
        )
    )
    assert sweep(str(sweep_file)) == 2
    err = capsys.readouterr().err
    assert "baseline 'missing': not a variant (variants: good, typo, wrong-type)" in err
    assert "variant typo: " in err and "filter.dedupe: unknown key (did you mean dedup?)" in err
    assert "variant wrong-type: " in err and "filter.workers" in err
    assert "variant good" not in err
    assert not (tmp / "runs").exists(), "nothing runs, nothing is written, while any variant is bad"


def test_a_sweep_killed_in_its_second_variant_resumes_without_redoing_the_first(toy):
    tmp, recipe = toy
    grid = ["--grid", "filter.dedup=true,false"]
    code = (
        "import sys, toystage; from distill import cli, pipeline; pipeline.STAGES = toystage.STAGES;"
        f"sys.exit(cli.main(['sweep', {str(recipe)!r}, '--grid', 'filter.dedup=true,false', '--no-progress']))"
    )
    env = {**os.environ, "TOY_HANG_RECIPE": "dedup-false", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HANGING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    runs = tmp / "runs" / "toy-sweep"
    first = {p.parent.name: p.read_text() for p in (runs / "dedup-true").glob("*/manifest.json")}
    assert len(first) == 2 and read_manifest(runs / "dedup-false" / "count") is None
    assert sweep(str(recipe), *grid) == 0
    assert {p.parent.name: p.read_text() for p in (runs / "dedup-true").glob("*/manifest.json")} == first
    assert read_manifest(runs / "dedup-false" / "count").recipe == "dedup-false"
    assert read_manifest(runs / "dedup-false" / "make").recipe == "dedup-true"


def test_a_failed_variant_does_not_stop_the_others_and_the_sweep_exits_nonzero(toy, monkeypatch, capsys):
    tmp, recipe = toy
    monkeypatch.setenv("TOY_FAIL_RECIPE", "dedup-true")
    assert sweep(str(recipe), "--grid", "filter.dedup=true,false", "--name", "f") == 1
    assert "1 variant(s) failed: dedup-true" in capsys.readouterr().err
    results = json.loads((tmp / "runs/f/results.json").read_text())
    assert results["variants"]["dedup-false"]["status"] == "incomplete"  # every stage finished; it has no eval
    assert results["variants"]["dedup-true"]["status"] == "failed"
    assert results["variants"]["dedup-true"]["error"] == "toy count: told to fail for dedup-true"
    assert "## Failed variants" in (tmp / "runs/f/report.md").read_text()


def test_a_sweep_file_declares_grid_named_variants_common_overrides_and_baseline(toy):
    tmp, recipe = toy
    path = tmp / "s.yaml"
    sweep_section = {
        "recipe": str(recipe),
        "grid": {"filter.selection": ["all_correct", "shortest_correct"], "filter.pass_rate": [None, [0.1, 0.9]]},
        "variants": {"no-verify": ["filter.verify=false"]},
        "set": ["filter.dedup=false"],
        "baseline": "no-verify",
    }
    path.write_text(yaml.safe_dump({"sweep": sweep_section}, sort_keys=False))
    plan = load_sweep(path, common=["filter.workers=1"])
    assert (
        plan.name == "s" and plan.baseline == "no-verify" and plan.common == ("filter.dedup=false", "filter.workers=1")
    )
    assert [v.name for v in plan.variants] == [
        "selection-all_correct_pass_rate-null",
        "selection-all_correct_pass_rate-0.1-0.9",
        "selection-shortest_correct_pass_rate-null",
        "selection-shortest_correct_pass_rate-0.1-0.9",
        "no-verify",
    ]
    second = plan.variant("selection-all_correct_pass_rate-0.1-0.9")
    assert second.overrides == ("filter.selection=all_correct", "filter.pass_rate=[0.1, 0.9]")
    assert second.recipe.filter.pass_rate == (0.1, 0.9) and second.recipe.filter.dedup is False
    assert (
        plan.variant("no-verify").recipe.filter.verify is False
        and plan.variant("no-verify").recipe.name == "no-verify"
    )
    path.write_text(yaml.safe_dump({"sweep": {"recipe": str(recipe), "gird": {}}}))
    with pytest.raises(RecipeError, match=r"s.yaml: sweep.gird: Extra inputs are not permitted"):
        load_sweep(path)
