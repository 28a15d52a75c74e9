"""`python -m distill.gpu_check` on CPU: the CPU-runnable path runs for real (vLLM on CPU), the CUDA paths are skipped
with their reason, and a path that breaks is reported failed, with its message, while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from distill.gpu_check import error_in_log, main
from distill.gpu_paths import PATHS

CUDA_ONLY = [p.name for p in PATHS if p.cpu_skip is not None]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU on purpose: the CPU behaviour under test, on any machine
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, "-m", "distill.gpu_check", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def result_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split(" ", 1)[0] in ("ok", "failed", "skipped")]


@pytest.mark.slow
def test_gpu_check_on_cpu_runs_vllm_generation_and_skips_the_cuda_paths(tmp_path: Path) -> None:
    proc = gpu_check("--out", str(tmp_path), "--only", ",".join(["vllm_generate", *CUDA_ONLY]))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    paths = summary["paths"]
    assert set(paths) == {"vllm_generate", *CUDA_ONLY} and summary["cuda"] is False
    generate = paths["vllm_generate"]
    assert generate["status"] == "ok" and generate["error"] is None and generate["seconds"] > 0
    assert generate["details"]["traces"] == 8 and generate["details"]["completion_tokens"] > 0
    for name in CUDA_ONLY:
        assert paths[name]["status"] == "skipped", name
        assert paths[name]["reason"].startswith("no CUDA device ("), paths[name]
    lines = result_lines(proc.stdout)
    assert lines[0] == f"ok vllm_generate {generate['seconds']}s"
    assert lines[1:] == [f"skipped {name}: {paths[name]['reason']}" for name in CUDA_ONLY]  # the check's own order
    env = summary["environment"]
    assert env["cuda_available"] is False and env["devices"] == [] and env["torch"]
    assert {"torch", "trl", "transformers"} <= set(env["packages"])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "the summary is written through a temp name"


def test_gpu_check_reports_a_broken_path_as_failed_and_exits_nonzero(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = gpu_check("--out", str(tmp_path / "out"), "--model", str(missing), "--only", "vllm_generate,bf16_train")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    paths = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["paths"]
    failed = paths["vllm_generate"]
    assert failed["status"] == "failed" and str(missing) in failed["error"] and "\n" not in failed["error"]
    assert paths["bf16_train"]["status"] == "skipped", "a failed path does not stop the next one"
    assert Path(failed["log"]).is_file()
    assert result_lines(proc.stdout) == [
        f"failed vllm_generate: {failed['error']}",
        f"skipped bf16_train: {paths['bf16_train']['reason']}",
    ]


def test_gpu_check_refuses_unknown_path_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "vllm_generate,zero4"]) == 2
    err = capsys.readouterr().err
    assert "zero4" in err and "zero3" in err  # names the typo and the known paths


def test_gpu_check_error_names_the_rank_traceback_behind_a_failed_launch() -> None:
    log = (
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "x.py", line 1\n'
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "error: training launched with student.accelerate zero3 (recipes/accelerate/zero3.yaml) failed (exit code 1)"
        "; see the log above\n"
    )
    assert error_in_log(log) == (
        "training launched with student.accelerate zero3 (recipes/accelerate/zero3.yaml) failed (exit code 1); "
        "see the log above [torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB]"
    )
    assert error_in_log("loading\nValueError: bad value\n") == "ValueError: bad value"
