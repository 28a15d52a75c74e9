"""DeepSpeed ZeRO for real: the shipped zero2 / zero3 / zero3-offload launcher configs on 2 CPU processes.

DeepSpeed runs on CPU through its CPU accelerator over gloo, and accelerate enables it there (FSDP it does not, see
test_student_ddp.py), so what the configs promise is checked against a DDP run of the same recipe: ZeRO-3 leaves
each rank half of the weights and ZeRO-2 all of them (it shards gradients and optimizer state only); every config
trains the model DDP trains; the saved model is whole (ZeRO-3 gathers its shards at save time); a ZeRO-3 run
resumed from its checkpoint ends with the weights of the run that never stopped; LoRA under ZeRO-3 saves a whole
adapter that merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import TWO_PROCESSES
from distill.pipeline import StageReport
from student.train import run
from student_data import addition_rows, context, make_run

# constant LR: a run stopped at step 2 and resumed to 4 must follow the same schedule as one run to 4
SFT = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-3,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "save_steps": 2,
    "report_to": "none",
    "seed": 0,
    "use_cpu": True,  # a DeepSpeed config promises GPUs: training on CPU must be asked for
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
Run = tuple[StageReport, dict[str, Any], dict[str, torch.Tensor]]  # report, metrics.json, saved weights


def train(tiny_model: Path, tmp: Path, config: str, **student: Any) -> Run:
    """The train stage with `student.accelerate: config` on 2 CPU processes; rerun in the same `tmp`, it resumes."""
    student = {"model": str(tiny_model), "sft": SFT, "accelerate": config, **student}
    recipe, runs = make_run(tmp, addition_rows(32), student)
    report = run(recipe, ctx=context(runs, recipe, tmp / "work"))
    metrics = json.loads((tmp / "work" / "metrics.json").read_text())
    return report, metrics, load_file(tmp / "work" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in TWO_PROCESSES.items():
            env.setenv(name, value)
        return {
            config: train(tiny_model, tmp_path_factory.mktemp(config), config)
            for config in ("ddp", "zero2", "zero3", "zero3-offload")
        }


@pytest.mark.slow
@pytest.mark.parametrize(("config", "held"), [("zero2", 1.0), ("zero3", 0.5), ("zero3-offload", 0.5)])
def test_student_zero_config_shards_as_it_says_and_trains_the_ddp_model(
    config: str, held: float, runs: dict[str, Run], tiny_model: Path
) -> None:
    report, metrics, weights = runs[config]
    ddp_report, _, ddp_weights = runs["ddp"]
    assert ddp_report.extra["weights_held"] == [1.0, 1.0]
    assert report.extra["distributed_type"] == "DistributedType.DEEPSPEED"
    assert report.extra["weights_held"] == [held, held]
    processes = metrics["processes"]
    assert processes["rows_on_several_ranks"] == 0 and [r["rows"] for r in processes["ranks"]] == [16, 16]

    base = load_file(tiny_model / "model.safetensors")
    # the same tensors as the base (ZeRO-2's extra copy of the tied head dropped), whole: gathered, not shards
    assert set(weights) == set(base) and all(weights[name].shape == tensor.shape for name, tensor in base.items())
    moved = max((ddp_weights[name] - base[name]).abs().max().item() for name in base)
    apart = max((weights[name] - ddp_weights[name]).abs().max().item() for name in base)
    assert moved > 1e-2 and apart < 1e-4, f"{config}: {apart} from DDP's weights, which moved {moved}"
    steps, losses = zip(*[(e["step"], e["loss"]) for e in metrics["log_history"] if "loss" in e], strict=True)
    ddp_losses = [e["loss"] for e in runs["ddp"][1]["log_history"] if "loss" in e]
    assert steps == (1, 2, 3, 4) and losses == pytest.approx(ddp_losses, rel=1e-4) and losses[-1] < losses[0]


@pytest.mark.slow
def test_student_zero3_resumed_from_its_checkpoint_ends_with_the_unbroken_runs_weights(
    runs: dict[str, Run], tiny_model: Path, tmp_path: Path, two_processes: None
) -> None:
    train(tiny_model, tmp_path, "zero3", sft={**SFT, "max_steps": 2})  # stops after its step-2 checkpoint
    checkpoint = tmp_path / "work" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's partitioned optimizer and weight states
    _, metrics, weights = train(tiny_model, tmp_path, "zero3")
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["global_step"] == 4
    unbroken = runs["zero3"][2]
    assert all(torch.equal(weights[name], unbroken[name]) for name in unbroken)


@pytest.mark.slow
def test_student_lora_under_zero3_saves_the_whole_adapter_and_merges(
    tiny_model: Path, tmp_path: Path, two_processes: None
) -> None:
    report, metrics, merged = train(tiny_model, tmp_path, "zero3", peft=LORA, merge=True)
    assert report.extra["weights_held"] == [0.5, 0.5] and metrics["mode"] == "lora" and metrics["merged"]
    adapter = load_file(tmp_path / "work" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2  # 2 layers x 7 linear layers x (A, B), each whole: r x in, out x r
    prefix = "base_model.model.model.layers.1.self_attn.o_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (64, 8) and b.abs().max() > 1e-4
    base = load_file(tiny_model / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.allclose(merged[name], base[name] + (16 / 8) * b @ a, atol=1e-6)
