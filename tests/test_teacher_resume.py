"""kill -9 a real `distill generate` mid-run, rerun it: zero lost, zero duplicated, finished work kept as written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_ENGINE
from distill import files

pytestmark = pytest.mark.slow
PROBLEMS, SAMPLES = 120, 2


def _generate(recipe: Path, runs: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "generate", str(recipe), "--runs-dir", str(runs), "--no-progress"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
        )


def _complete_problems(rows: list[dict]) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    return {pid: sorted(r, key=lambda r: r["sample"]) for pid, r in by_id.items() if len(r) == SAMPLES}


def test_kill_9_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, tiny_model: Path, shared_data: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "killed",
                "data": {"spec": "math500", "path": str(shared_data / "math500" / "test.jsonl"), "limit": PROBLEMS},
                "teacher": {
                    "model": str(tiny_model),
                    "sampling": {"n": SAMPLES, "max_tokens": 64},
                    "engine": {**TINY_ENGINE, "max_num_seqs": 32},
                },
            }
        )
    )
    runs, log = tmp_path / "runs", tmp_path / "generate.log"
    process = _generate(recipe, runs, log)
    deadline = time.monotonic() + 180
    shard = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list((runs / "killed" / ".work").glob("generate-*/shard-0-of-1.jsonl")) if runs.exists() else []
        if found and found[0].stat().st_size > 0:
            shard = found[0]
            break
        time.sleep(0.05)
    assert shard is not None and process.poll() is None, f"no output before the end:\n{log.read_text()[-3000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _complete_problems(list(files.read_jsonl(shard, allow_torn_tail=True)))
    assert 0 < len(before) < PROBLEMS  # killed mid-run, with work on disk

    assert _generate(recipe, runs, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    stage_dir = runs / "killed" / "generate"
    counts = json.loads((stage_dir / "manifest.json").read_text())["counts"]
    assert counts["in"] == PROBLEMS and counts["dropped"] in ({}, {"prompt_too_long": PROBLEMS - counts["out"]})
    rows = [row for path in sorted(stage_dir.glob("*.jsonl")) for row in files.read_jsonl(path)]
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == counts["out"] * SAMPLES  # zero duplicated, zero lost
    after = _complete_problems(rows)
    assert all(after[pid] == traces for pid, traces in before.items())  # finished work was kept, not regenerated
    assert "already written" in log.read_text()
