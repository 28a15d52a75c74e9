"""What a first GPU-cluster run would hit, pinned on CPU: the two-node DeepSpeed launch makes one world, a GPU job on
a CPU install refuses to train, checkpoints push only model files and in the background, LoRA's frozen base loads in
the training precision, FSDP's checkpointing is resolved, and the world size and the shared run directory are
checked before the first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from distill.devices import device_facts, promised_gpus
from distill.errors import DistillError, RecipeError
from distill.schema import Recipe
from student import launch
from student.arguments import Kwargs
from student.checkpoints import PushCheckpoints
from student.train import run, sft_kwargs
from student.trainer import build_trainer, check_world_size, train
from student_data import addition_rows, context, make_run, plan_for
from test_hub import RecordingHfApi

FAST = {"max_steps": 1, "report_to": "none"}
# what a checkpoint upload holds: a transformers checkpoint's model files (weights, configs, tokenizer, template)
SENT = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors"]
SENT += ["tokenizer.json", "tokenizer_config.json"]
TWO_NODES = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29555", "NPROC_PER_NODE": "8"}


def _accelerate_runs(cmd: list[str]) -> tuple[list[str] | None, object]:
    """What `accelerate launch` does with our command line on a DeepSpeed config: the `deepspeed` command it would
    start (pdsh/ssh style, one world per node), or None with the torchrun arguments of one world."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(cmd[3:])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    deepspeed_cmd, _ = prepare_deepspeed_cmd_env(args)
    return deepspeed_cmd, args


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3-offload"])
def test_two_node_deepspeed_launch_is_one_world_of_16(name: str, tmp_path: Path) -> None:
    config = launch.load(name, env=TWO_NODES)
    cmd = launch.command(config.path, plan=tmp_path / "plan.json", env=TWO_NODES)
    deepspeed_cmd, args = _accelerate_runs(cmd)
    assert deepspeed_cmd is None, "accelerate would start DeepSpeed's own launcher"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.0.0.7:29555"  # every node meets node 0 there

    # Without the standard launcher accelerate goes through `deepspeed --hostfile None` (local node only): refused.
    settings = yaml.safe_load(config.path.read_text())
    del settings["deepspeed_config"]["deepspeed_multinode_launcher"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(settings))
    pdsh, _ = _accelerate_runs(launch.command(old, plan=tmp_path / "plan.json", env=TWO_NODES))
    assert pdsh[:3] == ["deepspeed", "--hostfile", "None"]
    with pytest.raises(RecipeError, match=r"set deepspeed_config\.deepspeed_multinode_launcher: standard"):
        launch.load(str(old), env=TWO_NODES)
    launch.load(str(old), env={})  # one node: every launcher makes one world


def test_a_world_that_is_not_nnodes_times_nproc_fails_before_the_first_step(tiny_model: Path, tmp_path: Path) -> None:
    check_world_size(16, expected=16)
    check_world_size(1, expected=None)
    plan = plan_for(tiny_model, tmp_path, rows=addition_rows(8), sft={"max_steps": 1})
    plan = plan.__class__(**{**plan.__dict__, "world_size": 16})
    with pytest.raises(DistillError, match="joined a world of 1 processes, but the launch asked for 16"):
        train(plan)
    assert not list((tmp_path / "ckpt").glob("checkpoint-*")) and not (tmp_path / "out").exists(), "no step ran"


@pytest.mark.parametrize(
    ("env", "promised"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, "SLURM_GPUS_PER_NODE=h100:8"),
        ({"SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_JOB_GPUS=0,1,2,3"),
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "8"}, None),  # hidden on purpose
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({}, None),
    ],
)
def test_promised_gpus_reads_cuda_and_slurm_variables(env: dict, promised: str | None) -> None:
    assert promised_gpus(env) == promised


@pytest.mark.parametrize(
    ("variables", "student", "named"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, {}, "CUDA_VISIBLE_DEVICES=0,1,2,3"),
        ({"SLURM_GPUS_ON_NODE": "8"}, {}, "SLURM_GPUS_ON_NODE=8"),
        ({}, {"accelerate": "zero2"}, "student.accelerate: zero2 (DEEPSPEED)"),
        ({}, {"accelerate": "fsdp"}, "student.accelerate: fsdp (FSDP)"),
    ],
)
def test_train_refuses_cpu_when_gpus_were_promised(
    variables: dict, student: dict, named: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    recipe, runs = make_run(tmp_path, addition_rows(4), {"model": str(tiny_model), "sft": FAST, **student})
    with pytest.raises(DistillError) as info:
        run(recipe, ctx=context(runs, recipe, tmp_path / "work"))
    assert f"GPUs are expected here ({named}) but torch" in str(info.value)
    assert "make install EXTRA=gpu" in str(info.value) and "set student.sft.use_cpu: true" in str(info.value)
    assert not (tmp_path / "work" / ".prep").exists(), "refused before any plan was written"

    recipe, _ = make_run(tmp_path, addition_rows(4), {"model": str(tiny_model), "sft": {**FAST, "use_cpu": True}})
    sft = resolve(recipe, work_dir=tmp_path, on_gpu=False).args
    assert sft["use_cpu"] is True and sft["bf16"] is False, "use_cpu: true makes CPU deliberate"


def resolve(recipe: Recipe, *, work_dir: Path, on_gpu: bool) -> Kwargs:
    """The train stage's final keyword arguments for `recipe`, as on a machine with or without a GPU."""
    kwargs, _ = sft_kwargs(
        recipe.student,
        base_config={},
        end_of_turn="<|im_end|>",
        work_dir=work_dir,
        on_gpu=on_gpu,
        progress=False,
        launcher=None,
    )
    return kwargs


def test_manifests_record_torch_cuda_build_and_devices(tmp_path: Path) -> None:
    import torch

    from conftest import finish_stage
    from distill.manifest import read_manifest

    facts = device_facts()
    assert facts == {
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "promised_by": promised_gpus(),
    }
    finish_stage(tmp_path / "stage", {})  # the manifest any stage gets
    assert read_manifest(tmp_path / "stage").devices == facts


def test_lora_and_qlora_load_the_frozen_base_in_the_training_precision(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    def resolved(student: dict) -> dict:
        recipe, _ = make_run(tmp_path, addition_rows(4), {"model": str(tiny_model), **student})
        return resolve(recipe, work_dir=tmp_path, on_gpu=True).args.get("model_init_kwargs") or {}

    lora = {"r": 4, "target_modules": "all-linear"}
    assert resolved({"peft": lora}) == {"dtype": "bfloat16"}
    assert resolved({"peft": lora, "quantization": "4bit"}) == {"dtype": "bfloat16"}
    assert resolved({"peft": lora, "sft": {"fp16": True, "bf16": False}}) == {"dtype": "float16"}
    assert resolved({"peft": lora, "sft": {"model_init_kwargs": {"dtype": "float32"}}}) == {"dtype": "float32"}
    assert resolved({}) == {}, "full fine-tuning keeps fp32 master weights"

    recipe, _ = make_run(tmp_path, addition_rows(4), {"model": str(tiny_model), "peft": lora})
    kwargs = resolve(recipe, work_dir=tmp_path, on_gpu=True)  # as the plan carries them to every process
    assert kwargs.peft == {"task_type": "CAUSAL_LM", **lora}, "PEFT's default task_type is in the plan, not implied"
    init = kwargs.args["model_init_kwargs"]  # the dtype reaches the model
    trainer = build_trainer(
        plan_for(tiny_model, tmp_path, rows=addition_rows(4), sft={"model_init_kwargs": init}, peft=kwargs.peft)
    )
    base = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" not in n}
    adapter = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert base == {torch.bfloat16} and adapter, (base, adapter)


@pytest.mark.parametrize(
    ("in_config", "sft", "expected"),
    [
        (False, {}, True),  # TRL's default (gradient_checkpointing on) becomes FSDP's
        (False, {"gradient_checkpointing": True}, True),
        (False, {"gradient_checkpointing": False}, False),
        (True, {"gradient_checkpointing": False}, True),  # the config asked for it
        (True, {"gradient_checkpointing": True}, True),  # the pair transformers refuses on GPUs
    ],
)
def test_fsdp_activation_checkpointing_replaces_gradient_checkpointing(
    in_config: bool, sft: dict, expected: bool
) -> None:
    fsdp = launch.load("fsdp")
    fsdp = fsdp.__class__(
        fsdp.name,
        fsdp.path,
        {**fsdp.settings, "fsdp_config": {**fsdp.settings["fsdp_config"], "fsdp_activation_checkpointing": in_config}},
    )
    resolved, note = launch.resolve_checkpointing(fsdp, sft=sft, default=True)
    assert sft["gradient_checkpointing"] is False, "never both"
    assert resolved.settings["fsdp_config"]["fsdp_activation_checkpointing"] is expected
    assert (note is not None) is expected
    ddp = launch.load("ddp")
    plain = {"gradient_checkpointing": True}
    assert launch.resolve_checkpointing(ddp, sft=plain, default=True) == (ddp, None)
    assert plain == {"gradient_checkpointing": True}, "only FSDP changes it"


class GatedHfApi(RecordingHfApi):
    """The recorder, whose uploads wait until the test opens the gate (a slow network, made deterministic)."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.gate, self.fail = threading.Event(), fail

    def upload_folder(self, **kwargs):
        assert self.gate.wait(timeout=60)
        if self.fail:
            raise ConnectionError("the Hub went away")
        return super().upload_folder(**kwargs)


def _deepspeed_checkpoint(folder: Path) -> None:
    """A checkpoint as a ZeRO-3 run with zero3_save_16bit_model leaves it: model files at the top, states below."""
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "trainer_state.json",
        "training_args.bin",
        "scheduler.pt",
        "rng_state_0.pth",
        "latest",
        "zero_to_fp32.py",
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    for name in ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        (folder / "global_step4" / name).parent.mkdir(exist_ok=True)
        (folder / "global_step4" / name).write_text("90 GB of Adam state")


def test_checkpoint_push_sends_model_files_in_the_background_and_survives_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill import hub

    api = GatedHfApi()
    monkeypatch.setattr(hub, "make_api", lambda: api)
    out = tmp_path / "checkpoints"
    _deepspeed_checkpoint(out / "checkpoint-4")
    callback = PushCheckpoints(repo_id="me/s", private=True, branch="run-x")
    args, state = SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=4, is_world_process_zero=True)
    callback.on_save(args, state, None)
    assert "upload_folder" not in [name for name, _ in api.calls], "on_save returned first: rank 0 does not stall"
    (out / "checkpoint-4" / "model.safetensors").unlink()  # rotation (save_total_limit) deletes it meanwhile
    api.gate.set()
    result = callback.wait()
    (upload,) = [kwargs for name, kwargs in api.calls if name == "upload_folder"]
    assert sorted(upload["files"]) == SENT
    assert upload["revision"] == "run-x-step-4" and result["sent"][0]["revision"] == "run-x-step-4"
    assert result["failed"] == [] and not list((out / ".push").iterdir()), "a sent snapshot is removed"


def test_checkpoint_push_that_fails_keeps_its_snapshot_and_resends_it_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill import hub

    out = tmp_path / "checkpoints"
    _deepspeed_checkpoint(out / "checkpoint-4")
    args, state = SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=4, is_world_process_zero=True)
    broken = GatedHfApi(fail=True)
    broken.gate.set()
    monkeypatch.setattr(hub, "make_api", lambda: broken)
    callback = PushCheckpoints(repo_id="me/s", private=True, branch="run-x")
    callback.on_save(args, state, None)
    result = callback.wait()
    assert result["sent"] == [] and result["failed"] == [
        {"checkpoint": "checkpoint-4", "error": "ConnectionError: the Hub went away"}
    ]
    assert (out / ".push" / "checkpoint-4" / "model.safetensors").is_file()

    api = GatedHfApi()
    api.gate.set()
    monkeypatch.setattr(hub, "make_api", lambda: api)
    resumed = PushCheckpoints(repo_id="me/s", private=True, branch="run-x")
    resumed.on_train_begin(args, state, None)
    assert resumed.wait()["failed"] == [] and not (out / ".push" / "checkpoint-4").exists()
    assert [kwargs["revision"] for name, kwargs in api.calls if name == "upload_folder"] == ["run-x-step-4"]


@pytest.mark.slow
def test_two_nodes_without_a_shared_runs_dir_fail_before_the_first_step(tiny_model: Path, tmp_path: Path) -> None:
    """runs/ copied to each node instead of shared: node 1 cannot see what node 0 wrote, and both nodes stop with
    one message before training, instead of node 0 resuming while node 1 starts fresh (a hang)."""
    import shutil

    from student.launch import free_port

    sft = {"max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 2, "report_to": "none", "seed": 0}
    _, runs = make_run(tmp_path, addition_rows(16), {"model": str(tiny_model), "sft": sft, "accelerate": "ddp"})
    shutil.copytree(runs, tmp_path / "node1-runs")  # what rsync-ing runs/ to each node gives
    cluster = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "train", str(tmp_path / "st.yaml"), "--runs-dir", str(where)],
            cwd=tmp_path,
            env={**os.environ, **cluster, "NODE_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, where in ((0, runs), (1, tmp_path / "node1-runs"))
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [2, 2], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "node(s) 1 cannot see node 0's work directory" in log, log[-3000:]
    assert not list((runs / "st" / ".work").glob("*/checkpoints/checkpoint-*")), "no step was trained"
    assert json.loads((runs / "st" / "filter" / "manifest.json").read_text())["stage"] == "filter"


@pytest.mark.parametrize(
    ("sft", "message"),
    [
        ({"use_liger_kernel": True}, "student.sft.use_liger_kernel: True needs the liger-kernel package"),
        (
            {"model_init_kwargs": {"attn_implementation": "flash_attention_2"}},
            "student.sft.model_init_kwargs.attn_implementation: flash_attention_2 needs the flash-attn package",
        ),
    ],
)
def test_kernel_packages_a_recipe_asks_for_are_checked_before_training(
    sft: dict, message: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("liger_kernel", "flash_attn"):
        monkeypatch.setitem(sys.modules, module, None)  # what the import system reports where it is not installed
    recipe, runs = make_run(tmp_path, addition_rows(4), {"model": str(tiny_model), "sft": {**FAST, **sft}})
    with pytest.raises(RecipeError, match=message):
        run(recipe, ctx=context(runs, recipe, tmp_path / "work"))
    assert not (tmp_path / "work" / ".prep").exists()
