"""A training run killed with SIGKILL after a checkpoint resumes from it on rerun (same recipe, same work dir)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill import pipeline
from student_data import addition_rows, make_run

MAX_STEPS, SAVE_STEPS = 80, 5


def complete_checkpoints(runs: Path) -> list[Path]:
    return sorted(runs.glob("st/.work/train-*/checkpoints/checkpoint-*/trainer_state.json"))


@pytest.mark.slow
def test_student_resumes_from_last_checkpoint_after_kill(tiny_model: Path, tmp_path: Path) -> None:
    sft = {
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "per_device_train_batch_size": 8,
        "logging_steps": 5,
        "learning_rate": 3e-3,
        "report_to": "none",
        "seed": 0,
    }
    recipe, runs = make_run(tmp_path, addition_rows(64), {"model": str(tiny_model), "sft": sft})
    cmd = [sys.executable, "-m", "distill.cli", "train", str(tmp_path / "st.yaml"), "--runs-dir", str(runs)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while not complete_checkpoints(runs) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before its first checkpoint could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = [int(p.parent.name.rpartition("-")[2]) for p in complete_checkpoints(runs)]
    assert saved and max(saved) < MAX_STEPS and not (runs / "st" / "train").exists()

    manifest = pipeline.run_stage(recipe, "train", runs_dir=runs, options=pipeline.StageOptions())
    metrics = json.loads((runs / "st" / "train" / "metrics.json").read_text())
    resumed = int(metrics["resumed_from"].rpartition("-")[2])
    assert resumed >= max(saved) and resumed % SAVE_STEPS == 0
    assert metrics["global_step"] == MAX_STEPS and manifest.extra["global_step"] == MAX_STEPS
    logged = [row["step"] for row in metrics["log_history"] if "loss" in row]
    assert logged[-1] == MAX_STEPS and (runs / "st" / "train" / "model.safetensors").is_file()
    assert not list((runs / "st" / ".work").glob("train-*"))  # swapped into place
