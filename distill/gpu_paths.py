"""The paths `distill.gpu_check` runs: for each, the tiny recipe it writes, the stage it runs, and what in the
stage's output proves the path really ran (a finished stage alone does not: accelerate runs an FSDP config as DDP
where it cannot shard, and the stages fall back to CPU settings where CUDA is missing).

Each path exercises exactly one stage. What that stage reads from upstream (the filter's kept rows, a trained
student) is written here by hand with a manifest, so a path never waits on another path or fails because of one.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import files
from distill.errors import DistillError
from distill.manifest import Manifest, read_manifest
from distill.manifest import finish_by_hand as mark_finished
from distill.tinymodel import CPU_ENGINE

PROMPT = "What is {a} + {b}?"
SAMPLES = 2  # teacher samples per problem in vllm_generate
# A few steps of each training path, one checkpoint at the end (DeepSpeed and FSDP leave their layout in it).
STEPS = 3
SFT = {
    "max_steps": STEPS,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": STEPS,
    "max_length": 256,
    "report_to": "none",
    "seed": 0,
}


class CheckFailed(DistillError):
    """The stage finished, but its output does not show the path it was meant to exercise."""


@dataclass(frozen=True)
class Workspace:
    """One path's folder (recipe.yaml, runs/, log.txt) and what the machine offers."""

    root: Path
    student: Path  # model folder the training paths start from
    teacher: Path  # model folder vLLM serves and the on-policy stage scores with (same tokenizer)
    cuda: bool
    precision: dict[str, bool]  # on CUDA {"bf16": True}, or {"fp16": True} on GPUs without it (V100, T4); CPU {}

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def recipe_name(self) -> str:
        return f"gpu-check-{self.root.name}"


@dataclass(frozen=True)
class GpuPath:
    name: str
    stage: str  # the distill command it runs
    timeout_s: int  # a cap far above the expected time: a hang fails this path, not the whole check
    recipe: Callable[[Workspace], dict[str, Any]]  # writes the upstream outputs, returns the recipe
    verify: Callable[[Workspace, Path], dict[str, Any]]  # the stage directory -> details; raises CheckFailed
    cpu_skip: str | None  # why it does not run without CUDA; None: it runs there with CPU settings
    bf16_only: bool = False  # skipped on GPUs without bf16 (an fp16 run would not check bf16)


def problems_file(ws: Workspace, count: int) -> Path:
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(count)]
    rows = [
        {"id": f"p{i}", "problem": PROMPT.format(a=a, b=b), "answer": str(a + b)} for i, (a, b) in enumerate(pairs)
    ]
    path = ws.root / "problems.jsonl"
    files.write_jsonl(path, rows)
    return path


def finish_by_hand(stage_dir: Path, *, recipe: str, counts: dict[str, Any]) -> None:
    """Mark an upstream output made here as finished: the runner then hands it to the stage under check."""
    mark_finished(stage_dir, counts=counts, recipe=recipe, tag="gpu-check")


def kept_rows(ws: Workspace, count: int = 32) -> None:
    """A finished filter stage: R1-style additions, as the filter keeps them (`messages` is what train reads)."""
    rng = random.Random(1)
    rows = []
    for i in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        answer = f"<think>\n{a} + {b}: ones first, then tens, then hundreds: {a + b}.\n</think>\n\n\\boxed{{{a + b}}}"
        user = PROMPT.format(a=a, b=b) + " Please reason step by step, and put your final answer within \\boxed{}."
        rows.append(
            {
                "id": f"add-{i}",
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            }
        )
    stage = ws.runs / ws.recipe_name() / "filter"
    files.write_jsonl(stage / "kept.jsonl", rows)
    finish_by_hand(stage, recipe=ws.recipe_name(), counts={"in": count, "out": count, "dropped": {}})


def finished_stage(ws: Workspace, stage_dir: Path) -> tuple[Manifest, dict[str, Any]]:
    """The stage's manifest and metrics.json (empty for stages without one); checks it ran on CUDA where asked."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise CheckFailed(f"{stage_dir}: no manifest.json although the command succeeded")
    if ws.cuda and not (manifest.devices or {}).get("cuda_available"):
        raise CheckFailed(f"{stage_dir}/manifest.json: the stage ran without CUDA ({manifest.devices})")
    metrics_file = stage_dir / "metrics.json"
    return manifest, files.read_json(metrics_file) if metrics_file.is_file() else {}


# --- vllm_generate: the teacher's offline generation -------------------------------------------------------------


def generate_recipe(ws: Workspace) -> dict[str, Any]:
    """On CUDA the engine's own defaults (torch.compile, CUDA graphs) as real recipes get them, in a fifth of the
    GPU's memory; few sequences at once, so few graphs to capture. Without CUDA the demo's CPU engine."""
    dtype = "bfloat16" if ws.precision.get("bf16") else "float16"
    gpu = {"dtype": dtype, "gpu_memory_utilization": 0.2, "max_model_len": 1024, "max_num_seqs": 16, "seed": 0}
    sampling = {"n": SAMPLES, "temperature": 1.0, "top_p": 1.0, "max_tokens": 32}
    return {
        "name": ws.recipe_name(),
        "data": {"spec": "local_jsonl", "path": str(problems_file(ws, 4))},
        "teacher": {
            "backend": "vllm",
            "model": str(ws.teacher),
            "sampling": sampling,
            "engine": gpu if ws.cuda else dict(CPU_ENGINE),
        },
    }


def generate_verify(ws: Workspace, stage_dir: Path) -> dict[str, Any]:
    manifest, _ = finished_stage(ws, stage_dir)
    expected = manifest.counts["in"] * SAMPLES
    traces, tokens = manifest.counts.get("traces", 0), manifest.extra.get("completion_tokens", 0)
    if traces != expected or tokens <= 0:
        raise CheckFailed(f"{stage_dir}: {traces} traces with {tokens} tokens, expected {expected} traces")
    return {"traces": traces, "completion_tokens": tokens, "tokens_per_s": manifest.extra.get("tokens_per_s")}


# --- training paths: bf16, ZeRO-2/3, QLoRA, FSDP -----------------------------------------------------------------


def train_recipe(ws: Workspace, **student: Any) -> dict[str, Any]:
    kept_rows(ws)
    return {
        "name": ws.recipe_name(),
        "data": {"spec": "local_jsonl", "path": str(problems_file(ws, 4))},  # required; train reads the kept rows
        "student": {"model": str(ws.student), "sft": {**SFT, **ws.precision}, **student},
    }


def trained(ws: Workspace, stage_dir: Path) -> tuple[Manifest, dict[str, Any]]:
    manifest, metrics = finished_stage(ws, stage_dir)
    loss = metrics.get("loss_last")
    if metrics.get("global_step") != STEPS or not (isinstance(loss, float) and math.isfinite(loss)):
        raise CheckFailed(f"{stage_dir}/metrics.json: {metrics.get('global_step')} steps, last loss {loss}")
    return manifest, metrics


def train_details(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("mode", "global_step", "loss_first", "loss_last", "world_size")}


def bf16_verify(ws: Workspace, stage_dir: Path) -> dict[str, Any]:
    return train_details(trained(ws, stage_dir)[1])


def sharded_verify(kind: str, marker: str) -> Callable[[Workspace, Path], dict[str, Any]]:
    """`kind` (DEEPSPEED, FSDP) must have trained: its own files in the checkpoint (`marker`, a glob), and with
    several ranks the engine each rank reports. One rank writes no rank reports, hence the checkpoint layout."""

    def verify(ws: Workspace, stage_dir: Path) -> dict[str, Any]:
        _, metrics = trained(ws, stage_dir)
        found = sorted(p.name for p in stage_dir.glob(f"checkpoints/checkpoint-*/{marker}"))
        if not found:
            raise CheckFailed(f"{stage_dir}/checkpoints: no {marker} in the checkpoint, so {kind} did not train")
        ranks = (metrics.get("processes") or {}).get("ranks") or []
        ran = sorted({r["distributed_type"] for r in ranks})
        if ranks and ran != [f"DistributedType.{kind}"]:
            raise CheckFailed(f"{stage_dir}/metrics.json: accelerate ran {ran}, not {kind}")
        return {**train_details(metrics), "checkpoint": found, "weights_held": [r["weights_held"] for r in ranks]}

    return verify


def qlora_verify(ws: Workspace, stage_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    _, metrics = trained(ws, stage_dir)
    adapter = stage_dir / "adapter_model.safetensors"
    if metrics.get("mode") != "qlora" or not adapter.is_file():
        raise CheckFailed(f"{stage_dir}: mode {metrics.get('mode')!r}, adapter file present: {adapter.is_file()}")
    lora_b = [tensor for key, tensor in load_file(adapter).items() if "lora_B" in key]
    if not lora_b or all(float(t.abs().sum()) == 0 for t in lora_b):  # LoRA B starts at zero
        raise CheckFailed(f"{adapter}: every lora_B is still zero: the adapter did not train")
    return train_details(metrics)


# --- onpolicy_vllm: the student samples with colocated vLLM, the teacher scores ----------------------------------


def onpolicy_recipe(ws: Workspace) -> dict[str, Any]:
    """The stage starts from the train stage's student: the tiny student, copied in as a finished train output."""
    train = ws.runs / ws.recipe_name() / "train"
    shutil.copytree(ws.student, train)
    finish_by_hand(train, recipe=ws.recipe_name(), counts={"in": 1, "out": 1, "dropped": {}})
    config = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "max_completion_length": 32,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        **ws.precision,
        "use_vllm": True,
        "vllm_mode": "colocate",  # as recipes/r1-distill-qwen2.5-math-1.5b-onpolicy.yaml
        "vllm_gpu_memory_utilization": 0.2,
        "vllm_max_model_length": 512,
    }
    return {
        "name": ws.recipe_name(),
        "data": {"spec": "local_jsonl", "path": str(problems_file(ws, 8))},
        "teacher": {"model": str(ws.teacher), "sampling": {"max_tokens": 32}},  # R1's 32,768 exceeds the context
        "student": {"model": str(ws.student)},
        "onpolicy": {"teacher": str(ws.teacher), "config": config},
    }


def onpolicy_verify(ws: Workspace, stage_dir: Path) -> dict[str, Any]:
    _, metrics = finished_stage(ws, stage_dir)
    sampled = (metrics.get("teacher_tokens") or {}).get("sampled_by_student")
    if metrics.get("global_step") != 2 or not (stage_dir / "model.safetensors").is_file():
        raise CheckFailed(f"{stage_dir}: {metrics.get('global_step')} steps, model written: no")
    return {"global_step": 2, "loss_last": metrics.get("loss_last"), "sampled_by_student": sampled}


NO_NCCL = "NCCL needs GPUs; ZeRO over gloo on CPU is tested in tests/test_student_zero.py"
PATHS: tuple[GpuPath, ...] = (
    GpuPath("vllm_generate", "generate", 240, generate_recipe, generate_verify, cpu_skip=None),
    GpuPath(
        "bf16_train",
        "train",
        150,
        train_recipe,
        bf16_verify,
        cpu_skip="bf16 training needs a GPU; on CPU the stage trains in fp32, which would check nothing here",
        bf16_only=True,
    ),
    GpuPath(
        "zero2",
        "train",
        180,
        lambda ws: train_recipe(ws, accelerate="zero2"),
        sharded_verify("DEEPSPEED", "global_step*"),
        cpu_skip=NO_NCCL,
    ),
    GpuPath(
        "zero3",
        "train",
        180,
        lambda ws: train_recipe(ws, accelerate="zero3"),
        sharded_verify("DEEPSPEED", "global_step*"),
        cpu_skip=NO_NCCL,
    ),
    GpuPath(
        "qlora",
        "train",
        150,
        lambda ws: train_recipe(
            ws, peft={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, quantization="4bit"
        ),
        qlora_verify,
        cpu_skip="QLoRA runs on CUDA GPUs; the train stage refuses student.quantization on CPU",
    ),
    GpuPath(
        "fsdp",
        "train",
        180,
        lambda ws: train_recipe(ws, accelerate="fsdp"),
        sharded_verify("FSDP", "pytorch_model_fsdp*"),
        cpu_skip="accelerate runs an FSDP config as plain DDP without GPUs",
    ),
    GpuPath(
        "onpolicy_vllm",
        "onpolicy",
        300,
        onpolicy_recipe,
        onpolicy_verify,
        cpu_skip="TRL's colocated vLLM sampling needs GPUs; the stage without vLLM is in tests/test_onpolicy.py",
    ),
)
