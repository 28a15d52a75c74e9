"""Superseded outputs: a re-run moves the previous output aside, changing the recipe back restores it untouched."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import toystage
from conftest import REPO
from distill import cli, files, pipeline, superseded
from distill.errors import DistillError
from distill.recipe import load_recipe

OPTS = pipeline.StageOptions(progress=False)
SHARDED = """
from distill import files
from distill.pipeline import StageReport
CALLS = []

def load(recipe):
    return None


def problems_hash(loaded):
    return "fixed"

def run(recipe, *, ctx):
    CALLS.append(ctx.options.shard)
    index, count = ctx.options.shard
    files.write_json(ctx.work_dir / f"part-{index}.json", {"limit": recipe.data[0].limit, "index": index})
    done = len(list(ctx.work_dir.glob("part-*.json"))) == count
    return StageReport(counts={"in": 1, "out": 1, "dropped": {}}, complete=done)
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy recipe and stages of test_pipeline, with every call of each toy stage counted."""
    monkeypatch.setattr(pipeline, "STAGES", dict(toystage.STAGES))
    data = tmp_path / "p.jsonl"
    files.write_jsonl(data, [{"problem": f"p{i}", "answer": str(i)} for i in range(5)])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: toy\ndata: {{spec: local_jsonl, path: {data}}}\n")
    calls = {"make": 0, "count": 0}
    for name in calls:
        module = pipeline.stage_module(pipeline.STAGES[name])
        original = module.run

        def counted(recipe, *, ctx, _name=name, _run=original):
            calls[_name] += 1
            return _run(recipe, ctx=ctx)

        monkeypatch.setattr(module, "run", counted)
    return tmp_path, recipe_path, calls


def run_all(recipe_path: Path, runs: Path, *overrides: str, options=OPTS) -> dict:
    recipe = load_recipe(recipe_path, overrides=overrides)
    return {m.stage: m for m in pipeline.run_all(recipe, runs_dir=runs, options=options)}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kept(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / superseded.SUPERSEDED).iterdir() if not p.name.startswith("."))


def test_changed_value_and_back_is_a_cache_hit_restoring_the_output_byte_for_byte(toy, caplog):
    tmp, recipe_path, calls = toy
    run_dir = tmp / "runs/toy"
    first = run_all(recipe_path, tmp / "runs")
    scratch = run_dir / ".work" / "merged-0123456789ab"  # eval's merge scratch: never swept aside
    files.write_json(scratch / "config.json", {})
    before = {stage: snapshot(run_dir / stage) for stage in ("make", "count")}
    run_all(recipe_path, tmp / "runs", "data.0.limit=3")  # the typo
    keys = {s: superseded.fingerprint(m.section_hash, m.input_hash) for s, m in first.items()}
    assert kept(run_dir) == [f"count-{keys['count']}", f"make-{keys['make']}"]
    assert calls == {"make": 2, "count": 2}
    caplog.set_level(logging.INFO, logger="distill")
    again = run_all(recipe_path, tmp / "runs")  # the typo fixed
    assert calls == {"make": 2, "count": 2}, "restored, not re-run"
    assert {stage: snapshot(run_dir / stage) for stage in ("make", "count")} == before
    assert again == first
    assert sum("cache hit, restored the superseded output" in r.message for r in caplog.records) == 2
    assert len(kept(run_dir)) == 2 and all(p not in first for p in kept(run_dir))  # the limit=3 pair, aside in turn
    assert [p.name for p in (run_dir / ".work").iterdir()] == [scratch.name]
    run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    assert calls == {"make": 2, "count": 2}, "and back again: a hit both ways"


def test_a_superseded_output_whose_files_changed_is_not_restored(toy, caplog):
    tmp, recipe_path, calls = toy
    run_dir = tmp / "runs/toy"
    first = run_all(recipe_path, tmp / "runs")
    run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    key = superseded.fingerprint(first["make"].section_hash, first["make"].input_hash)
    files.write_jsonl(superseded.slot(run_dir, "make", key) / "rows.jsonl", [{"problem": "edited"}])
    run_all(recipe_path, tmp / "runs")
    assert calls["make"] == 3 and "no longer matches its manifest" in caplog.text
    assert files.sha256_tree(run_dir / "make") == first["make"].output_hash


def test_forced_rerun_keeps_one_superseded_output_per_fingerprint(toy):
    tmp, recipe_path, calls = toy
    recipe = load_recipe(recipe_path)
    run_all(recipe_path, tmp / "runs")
    for _ in range(2):
        pipeline.run_stage(recipe, "make", runs_dir=tmp / "runs", options=OPTS, force=True)
    assert calls["make"] == 3
    assert [p.name.split("-")[0] for p in (tmp / "runs/toy/.superseded").iterdir() if p.name[0] != "."] == ["make"]


def test_a_stage_that_sends_is_restored_only_for_a_dry_run(toy):
    tmp, recipe_path, calls = toy
    pipeline.STAGES["make"] = dataclasses.replace(pipeline.STAGES["make"], sends=True)  # like push
    run_all(recipe_path, tmp / "runs")
    run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    run_all(recipe_path, tmp / "runs")
    assert calls["make"] == 3, "a restored record of a send would not send again: it re-runs"
    run_all(recipe_path, tmp / "runs", "data.0.limit=3", options=dataclasses.replace(OPTS, dry_run=True))
    assert calls["make"] == 3


def test_kill_during_a_run_leaves_superseded_outputs_untouched(toy):
    tmp, recipe_path, calls = toy
    run_dir = tmp / "runs/toy"
    run_all(recipe_path, tmp / "runs")
    run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    aside = {name: snapshot(run_dir / ".superseded" / name) for name in kept(run_dir)}
    current = snapshot(run_dir / "make")
    code = (
        "import toystage; from pathlib import Path; from distill import pipeline;"
        "from distill.recipe import load_recipe;"
        "pipeline.STAGES = toystage.STAGES;"
        f"pipeline.run_stage(load_recipe({str(recipe_path)!r}, overrides=['data.0.limit=2']), 'make',"
        f" runs_dir=Path({str(tmp / 'runs')!r}), options=pipeline.StageOptions())"
    )
    env = {**os.environ, "TOY_HANG": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HANGING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {name: snapshot(run_dir / ".superseded" / name) for name in kept(run_dir)} == aside
    assert snapshot(run_dir / "make") == current
    run_all(recipe_path, tmp / "runs")
    assert calls["make"] == 2, "the original is still restorable"


def test_kill_between_the_two_renames_of_a_swap_loses_nothing(toy, monkeypatch):
    tmp, recipe_path, calls = toy
    run_dir = tmp / "runs/toy"
    run_all(recipe_path, tmp / "runs")
    move_aside = superseded.move_aside

    def aside_then_die(run_dir: Path, out_dir: Path) -> None:  # the kill lands between the swap's two renames
        move_aside(run_dir, out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(superseded, "move_aside", aside_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    monkeypatch.setattr(superseded, "move_aside", move_aside)
    assert not (run_dir / "make").exists() and len(kept(run_dir)) == 1
    manifests = run_all(recipe_path, tmp / "runs", "data.0.limit=3")
    assert calls["make"] == 2 and manifests["make"].counts["out"] == 3, "the finished work dir is swapped in"
    run_all(recipe_path, tmp / "runs")
    assert calls["make"] == 2, "and the original restored"


def test_sharded_stage_restores_once_and_every_shard_sees_it_cached(tmp_path, monkeypatch):
    (tmp_path / "toyshard.py").write_text(SHARDED)
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = pipeline.Stage("make", "toyshard", ("data",), (), "filter", problems=True)
    monkeypatch.setattr(pipeline, "STAGES", {"make": stage})
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("name: sh\ndata: {spec: local_jsonl, path: p.jsonl}\n")
    module = pipeline.stage_module(stage)

    def shards(*overrides: str) -> list:
        recipe = load_recipe(recipe_path, overrides=overrides)
        return [
            pipeline.run_stage(recipe, "make", runs_dir=tmp_path / "runs", options=pipeline.StageOptions(shard=(i, 2)))
            for i in range(2)
        ]

    first = shards()
    assert first[0] is None and first[1] is not None  # the last shard finishes the stage
    shards("data.0.limit=3")
    assert len(module.CALLS) == 4
    back = shards()
    assert len(module.CALLS) == 4 and back == [first[1], first[1]]
    assert files.read_json(tmp_path / "runs/sh/make/part-1.json")["limit"] is None


def test_gc_lists_removes_and_keeps_the_newest(toy, capsys, caplog):
    tmp, recipe_path, _ = toy
    run_dir = tmp / "runs/toy"
    args = [str(recipe_path), "--runs-dir", str(tmp / "runs")]
    for limit in (1, 2, 3):
        run_all(recipe_path, tmp / "runs", f"data.0.limit={limit}")
        time.sleep(1.1)  # finish times have one-second resolution; --keep picks the newest by them
    run_all(recipe_path, tmp / "runs")
    entries = superseded.entries(run_dir)
    assert [e.stage for e in entries].count("make") == 3 and len(entries) == 6
    assert cli.main(["gc", *args]) == 0
    listing = capsys.readouterr().out
    assert all(e.key in listing and e.manifest.finished_at in listing for e in entries) and "6 superseded" in listing
    rows = {r["stage"]: r["superseded"] for r in pipeline.status(load_recipe(recipe_path), runs_dir=tmp / "runs")}
    size = superseded.human(sum(e.size for e in entries if e.stage == "make"))
    assert rows["make"] == f"3 ({size})" and rows["count"].startswith("3 (")
    assert cli.main(["status", *args]) == 0 and f"3 ({size})" in capsys.readouterr().out
    assert cli.main(["gc", *args, "--keep", "1"]) == 2 and "use it with --remove" in capsys.readouterr().err
    assert cli.main(["gc", *args, "--remove", "--keep", "1"]) == 0
    assert "removed 4 superseded outputs" in capsys.readouterr().out
    left = superseded.entries(run_dir)
    assert {(e.stage, e.manifest.counts["out"]) for e in left} == {("make", 3), ("count", 1)}
    assert cli.main(["gc", *args, "--remove"]) == 0 and not superseded.entries(run_dir)
    assert [r["superseded"] for r in pipeline.status(load_recipe(recipe_path), runs_dir=tmp / "runs")] == ["", ""]


def test_a_stray_folder_in_superseded_is_an_error_naming_it(toy):
    tmp, _, _ = toy
    stray = tmp / "runs/toy/.superseded/notes"
    stray.mkdir(parents=True)
    with pytest.raises(DistillError, match=f"^{re.escape(str(stray))}: not a superseded stage output"):
        superseded.entries(tmp / "runs/toy")
