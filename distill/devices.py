"""Which accelerators a job was promised, and which it has.

On a cluster the environment is often installed on a login node without GPUs, which picks the CPU build of torch
and vLLM; the GPU job that runs later then sees no CUDA and would train (or generate) on CPU for days. The stages
compare what the scheduler and the launcher promised (`CUDA_VISIBLE_DEVICES`, Slurm's `SLURM_GPUS*` and
`SLURM_JOB_GPUS`, a DeepSpeed or FSDP launcher config) with what torch sees, and refuse the mismatch before any
work. `CUDA_VISIBLE_DEVICES=""` (or `-1`) says "no GPUs" on purpose and silences the Slurm variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from distill.errors import DistillError

# Slurm variables holding a GPU count (possibly `type:count`) or a list of GPU indices for this job or step.
SLURM_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")
SLURM_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
NO_DEVICES = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU


def promised_gpus(env: Mapping[str, str] = os.environ) -> str | None:
    """The environment variable that says this job has GPUs (as `NAME=value`), or None."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return None if visible.strip() in NO_DEVICES else f"CUDA_VISIBLE_DEVICES={visible}"
    for name in SLURM_COUNTS:
        count = env.get(name, "").rsplit(":", 1)[-1].strip()
        if count and count != "0":
            return f"{name}={env[name]}"
    for name in SLURM_LISTS:
        if env.get(name, "").strip():
            return f"{name}={env[name]}"
    return None


def refuse_cpu_fallback(
    *, what: str, launcher: str | None = None, escape: str, env: Mapping[str, str] = os.environ
) -> None:
    """Raise when GPUs were promised (by the environment, or by `launcher`: a config that only makes sense on GPUs)
    but torch sees none. `what` names the stage work; `escape` the recipe setting that makes CPU deliberate."""
    import torch

    if torch.cuda.is_available():
        return
    reason = promised_gpus(env) or launcher
    if reason is None:
        return
    raise DistillError(
        f"{what}: GPUs are expected here ({reason}) but torch {torch.__version__} sees none (CUDA build: "
        f"{torch.version.cuda}): this environment was probably installed without GPUs (a login node picks the CPU "
        f"build). Reinstall on a GPU node with `make install EXTRA=gpu`, or {escape} to run on CPU on purpose"
    )


def device_facts() -> dict[str, Any] | None:
    """What torch could run on, for manifests: its CUDA build, whether CUDA works, the device count. None when the
    process never imported torch (filter, push): importing it only to say so would cost seconds. Reads no device
    names, which would create a CUDA context in a process that only launches the training processes."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    available = torch.cuda.is_available()
    return {
        "torch_cuda": torch.version.cuda,
        "cuda_available": available,
        "device_count": torch.cuda.device_count() if available else 0,
        "promised_by": promised_gpus(),
    }
