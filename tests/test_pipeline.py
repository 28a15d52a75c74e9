"""The stage runner: skip when the manifest matches, re-run on change, crash-safe swap, status table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import toystage
from conftest import REPO
from distill import files, pipeline
from distill.manifest import canonical_hash, read_manifest
from distill.recipe import load_recipe

OPTS = pipeline.StageOptions(progress=False)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A recipe over a 5-row data file, with the runner's stage table swapped for the two toy stages."""
    monkeypatch.setattr(pipeline, "STAGES", toystage.STAGES)
    data = tmp_path / "p.jsonl"
    files.write_jsonl(data, [{"problem": f"p{i}", "answer": str(i)} for i in range(5)])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: toy\ndata: {{spec: local_jsonl, path: {data}}}\n")
    return tmp_path, recipe_path, data


def run_all(recipe_path, runs, *overrides, force=frozenset()):
    recipe = load_recipe(recipe_path, overrides=overrides)
    return {m.stage: m for m in pipeline.run_all(recipe, runs_dir=runs, options=OPTS, force=force)}


def test_fingerprint_ignores_key_order_and_sees_every_value():
    assert canonical_hash({"a": 1, "b": {"c": [1, 2]}}) == canonical_hash({"b": {"c": [1, 2]}, "a": 1})
    assert canonical_hash({"a": 1}) != canonical_hash({"a": 1.5})
    assert canonical_hash({"a": [1, 2]}) != canonical_hash({"a": [2, 1]})


def test_pipeline_second_run_is_cached(toy):
    tmp, recipe_path, _ = toy
    first = run_all(recipe_path, tmp / "runs")
    second = run_all(recipe_path, tmp / "runs")
    assert [m.finished_at for m in first.values()] == [m.finished_at for m in second.values()]
    assert first["make"].counts == {"in": 5, "out": 5, "dropped": {"over_limit": 0}}
    manifest = read_manifest(tmp / "runs/toy/make")
    assert manifest.output_hash == files.sha256_tree(tmp / "runs/toy/make")
    assert {"torch", "datasets"} <= manifest.versions.keys() and manifest.host and manifest.wall_s >= 0
    assert not list((tmp / "runs/toy/.work").iterdir()), "finished work dirs are swapped in, not left behind"


def test_pipeline_changed_section_reruns_it_and_everything_downstream(toy):
    tmp, recipe_path, _ = toy
    first = run_all(recipe_path, tmp / "runs")
    time.sleep(1.1)  # finished_at has one-second resolution
    second = run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    assert second["make"].finished_at != first["make"].finished_at
    assert second["count"].input_hash != first["count"].input_hash
    assert json.loads((tmp / "runs/toy/count/count.json").read_text())["rows"] == 3


def test_pipeline_downstream_change_leaves_upstream_cached(toy):
    tmp, recipe_path, _ = toy
    first = run_all(recipe_path, tmp / "runs")
    time.sleep(1.1)
    second = run_all(recipe_path, tmp / "runs", "filter.dedup=false")
    assert second["make"].finished_at == first["make"].finished_at
    assert second["count"].finished_at != first["count"].finished_at


def test_pipeline_forced_rerun_with_identical_output_keeps_downstream_cached(toy):
    tmp, recipe_path, _ = toy
    first = run_all(recipe_path, tmp / "runs")
    time.sleep(1.1)
    second = run_all(recipe_path, tmp / "runs", force=frozenset({"make"}))
    assert second["make"].finished_at != first["make"].finished_at
    assert second["make"].output_hash == first["make"].output_hash
    assert second["count"].finished_at == first["count"].finished_at


def test_pipeline_changed_input_file_reruns(toy):
    tmp, recipe_path, data = toy
    first = run_all(recipe_path, tmp / "runs")
    files.write_jsonl(data, [{"problem": "new", "answer": "1"}])
    time.sleep(1.1)
    second = run_all(recipe_path, tmp / "runs")
    assert second["make"].input_hash != first["make"].input_hash and second["make"].counts["in"] == 1


def test_pipeline_status_table(toy):
    tmp, recipe_path, _ = toy
    recipe = load_recipe(recipe_path)
    assert [r["state"] for r in pipeline.status(recipe, runs_dir=tmp / "runs")] == ["missing", "missing"]
    run_all(recipe_path, tmp / "runs")
    rows = pipeline.status(recipe, runs_dir=tmp / "runs")
    assert [(r["stage"], r["state"], r["in"], r["out"]) for r in rows] == [
        ("make", "done", 5, 5),
        ("count", "done", 5, 1),
    ]
    changed = load_recipe(recipe_path, overrides=["data.0.limit=2"])
    assert [r["state"] for r in pipeline.status(changed, runs_dir=tmp / "runs")] == ["stale", "done"]
    files.write_jsonl(tmp / "runs/toy/make/rows.jsonl", [{"problem": "edited by hand"}])
    pipeline.run_stage(recipe, "make", runs_dir=tmp / "runs", options=OPTS, force=True)
    assert [r["state"] for r in pipeline.status(recipe, runs_dir=tmp / "runs")] == ["done", "done"]


def test_a_stage_loads_its_problems_once(toy):
    """One load per run: the runner hashes what it loaded and hands the same object to the stage."""
    tmp, recipe_path, _ = toy
    toystage.LOADS.clear()
    pipeline.run_stage(load_recipe(recipe_path), "make", runs_dir=tmp / "runs", options=OPTS)
    assert len(toystage.LOADS) == 1


def test_status_reads_manifests_not_datasets(toy):
    """The manifest lists what its input hash was made of, so status judges from it without loading the data."""
    tmp, recipe_path, data = toy
    recipe = load_recipe(recipe_path)
    made = run_all(recipe_path, tmp / "runs")
    assert made["make"].inputs == {"problems": toystage.problems_hash(toystage.load(recipe))}
    assert made["count"].inputs == {"make": made["make"].output_hash}
    data.unlink()  # loading it now would fail: status must not need it
    toystage.LOADS.clear()
    assert [r["state"] for r in pipeline.status(recipe, runs_dir=tmp / "runs")] == ["done", "done"]


def test_pipeline_downstream_needs_upstream_output(toy):
    tmp, recipe_path, _ = toy
    with pytest.raises(pipeline.DistillError, match="stage count needs the output of make: run `distill make` first"):
        pipeline.run_stage(load_recipe(recipe_path), "count", runs_dir=tmp / "runs", options=OPTS)


def test_pipeline_kill_during_stage_leaves_previous_output(toy):
    tmp, recipe_path, _ = toy
    run_all(recipe_path, tmp / "runs")
    before = (tmp / "runs/toy/make/rows.jsonl").read_text()
    manifest_before = (tmp / "runs/toy/make/manifest.json").read_text()
    code = (
        "import sys, toystage; from distill import pipeline; from distill.recipe import load_recipe;"
        "pipeline.STAGES = toystage.STAGES;"
        f"pipeline.run_stage(load_recipe({str(recipe_path)!r}, overrides=['data.0.limit=2']), 'make',"
        f" runs_dir=__import__('pathlib').Path({str(tmp / 'runs')!r}), options=pipeline.StageOptions())"
    )
    env = {**os.environ, "TOY_HANG": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HANGING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp / "runs/toy/make/rows.jsonl").read_text() == before
    assert (tmp / "runs/toy/make/manifest.json").read_text() == manifest_before
    changed = load_recipe(recipe_path, overrides=["data.0.limit=2"])
    assert pipeline.status(changed, runs_dir=tmp / "runs")[0]["state"] == "stale"
    assert pipeline.run_stage(changed, "make", runs_dir=tmp / "runs", options=OPTS).counts["out"] == 2


def test_atomic_write_killed_midway_leaves_previous_file(tmp_path):
    target = tmp_path / "out.jsonl"
    files.write_jsonl(target, [{"v": "old"}])
    code = (
        "import sys, time; from distill import files\n"
        f"with files.atomic_open({str(target)!r}) as h:\n"
        "    h.write('{\"v\": \"new\"}\\n' * 1000); h.flush(); print('WRITING', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(files.read_jsonl(target)) == [{"v": "old"}]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out.jsonl"]
    assert leftovers and all(files.TMP_MARK in name for name in leftovers), leftovers
    assert files.sha256_tree(tmp_path) == files.sha256_tree(tmp_path, exclude=tuple(leftovers))


def test_read_jsonl_tolerates_only_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert list(files.read_jsonl(path, allow_torn_tail=True)) == [{"a": 1}, {"a": 2}]
    with pytest.raises(files.DataError, match=rf"^{path}:3: not valid JSON"):
        list(files.read_jsonl(path))
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(files.DataError, match=rf"^{path}:2: not valid JSON"):
        list(files.read_jsonl(path, allow_torn_tail=True))


def test_pipeline_endpoint_settings_do_not_change_the_generate_fingerprint(tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "name: t\ndata: {spec: local_jsonl, path: x.jsonl}\nteacher:\n  backend: openai\n  model: deepseek-reasoner\n"
        "  endpoint: {base_url: 'http://127.0.0.1:8000/v1'}\n"
    )
    generate = pipeline.STAGES["generate"]

    def fingerprint(*overrides):
        return pipeline.section_hash(load_recipe(recipe_path, overrides=overrides), generate, OPTS)

    base = fingerprint()
    assert (
        fingerprint("teacher.endpoint.base_url=http://10.0.0.7:8000/v1", "teacher.endpoint.max_concurrency=8") == base
    )
    assert fingerprint("teacher.sampling.temperature=0.7") != base
    assert fingerprint("teacher.model=other") != base
    assert fingerprint("teacher.endpoint.continue_final_message=true") != base, "forcing the prefix changes traces"


def test_pipeline_options_only_fingerprint_the_stage_they_change(toy):
    _, recipe_path, _ = toy
    recipe = load_recipe(recipe_path)
    plain, dry = pipeline.StageOptions(), pipeline.StageOptions(dry_run=True, model="m")
    for name in ("generate", "filter", "train"):
        stage = pipeline.Stage(name, "x", ("data",), (), "filter")
        assert pipeline.section_hash(recipe, stage, plain) == pipeline.section_hash(recipe, stage, dry)
    for name in ("eval", "push"):
        stage = pipeline.Stage(name, "x", ("data",), (), "filter")
        assert pipeline.section_hash(recipe, stage, plain) != pipeline.section_hash(recipe, stage, dry)
