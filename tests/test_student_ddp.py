"""Data parallelism for real: `accelerate launch` with recipes/accelerate/ddp.yaml runs 2 CPU processes over gloo.

Two independent single-process runs would also exit 0 and save (see ../shared/FACTS.md), so this asserts what only
real DDP gives: world_size 2 on both ranks, disjoint shards that cover the data, one rank that saves. The shipped
fsdp.yaml runs as DDP on CPU (and says so); the FSDP share-of-weights measurement is checked on torch's own FSDP2.
DeepSpeed ZeRO, which does run on CPU, is in test_student_zero.py."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from distill.errors import DistillError
from student.launch import first_error, record_error
from student.train import run
from student_data import addition_rows, context, make_run


@pytest.mark.slow
def test_student_ddp_two_cpu_processes_train_disjoint_shards_and_save_once(
    tiny_model: Path, tmp_path: Path, two_processes: None
) -> None:
    sft = {
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "learning_rate": 5e-3,
        "save_steps": 6,
        "report_to": "none",
        "seed": 0,
        "ddp_find_unused_parameters": False,
    }
    recipe, runs = make_run(tmp_path, addition_rows(48), {"model": str(tiny_model), "sft": sft, "accelerate": "ddp"})
    report = run(recipe, ctx=context(runs, recipe, tmp_path / "work"))

    metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
    processes = metrics["processes"]
    assert [r["world_size"] for r in processes["ranks"]] == [2, 2] and metrics["world_size"] == 2
    assert {r["backend"] for r in processes["ranks"]} == {"gloo"}
    assert {r["parallel_mode"] for r in processes["ranks"]} == {"ParallelMode.DISTRIBUTED"}
    assert processes["rows_on_several_ranks"] == 0 and processes["rows_seen"] == 48
    assert [r["rows"] for r in processes["ranks"]] == [24, 24]
    assert [r["should_save"] for r in processes["ranks"]] == [True, False]  # only rank 0 writes the model
    assert [(r["distributed_type"], r["weights_held"]) for r in processes["ranks"]] == [
        ("DistributedType.MULTI_CPU", 1.0)
    ] * 2, "DDP: every rank holds every weight"
    assert metrics["global_step"] == 12 and report.extra["loss_last"] < report.extra["loss_first"]
    assert metrics["epoch"] == pytest.approx(2.0)  # 12 steps x 2 ranks x 4 rows = 2 epochs of 48: real sharding
    checkpoints = sorted(p.name for p in (tmp_path / "work" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-12", "checkpoint-6"]
    assert (tmp_path / "work" / "model.safetensors").is_file()


@pytest.mark.slow
def test_student_fsdp_config_on_cpu_trains_as_ddp_and_says_it_did_not_shard(
    tiny_model: Path, tmp_path: Path, two_processes: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The shipped fsdp.yaml runs end to end on 2 CPU processes, but accelerate only shards on accelerators: the
    stage measures the weights each rank holds after training and warns instead of letting DDP pass for FSDP."""
    sft = {"max_steps": 4, "per_device_train_batch_size": 4, "report_to": "none", "seed": 0, "save_strategy": "no"}
    # use_cpu: an FSDP config promises GPUs; checkpointing asked the way every recipe asks becomes FSDP's own
    sft |= {"use_cpu": True, "gradient_checkpointing": True}
    recipe, runs = make_run(tmp_path, addition_rows(32), {"model": str(tiny_model), "sft": sft, "accelerate": "fsdp"})
    with caplog.at_level("INFO", logger="student"):  # student.train and student.arguments
        report = run(recipe, ctx=context(runs, recipe, tmp_path / "work"))
    assert "runs as FSDP's fsdp_activation_checkpointing; student.sft.gradient_checkpointing is off" in caplog.text
    assert (
        report.extra["distributed_type"] == "DistributedType.MULTI_CPU" and report.extra["weights_held"] == [1.0] * 2
    )
    assert "student.accelerate fsdp asks for FSDP, but accelerate ran DistributedType.MULTI_CPU" in caplog.text
    assert report.extra["global_step"] == 4 and (tmp_path / "work" / "model.safetensors").is_file()


def _shard_with_fsdp2(rank: int, model: str, port: int, out: str) -> None:
    """One of 2 gloo processes: FSDP2 `fully_shard` per decoder layer and at the root, as fsdp.yaml asks of
    accelerate on GPUs, then one forward/backward and the share of weights held."""
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from student.trainer import weights_held

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    net = AutoModelForCausalLM.from_pretrained(model)
    for layer in net.model.layers:
        fully_shard(layer)
    fully_shard(net)
    net(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    Path(out, f"{rank}.json").write_text(json.dumps(weights_held(net)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_weights_held_measures_real_fsdp2_shards(tiny_model: Path, tmp_path: Path) -> None:
    """accelerate will not run FSDP on CPU, but torch's FSDP2 does: the measurement the stage reports for FSDP runs
    on GPUs is checked here on real DTensor shards (each rank holds about half; the split is not exact)."""
    import torch.multiprocessing as mp

    from student.launch import free_port

    mp.spawn(_shard_with_fsdp2, args=(str(tiny_model), free_port(), str(tmp_path)), nprocs=2)
    held = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert sum(held) == pytest.approx(1.0) and all(0.45 < share < 0.55 for share in held), held


@pytest.mark.slow
def test_student_two_nodes_train_as_one_world_and_node_0_finishes_the_stage(tiny_model: Path, tmp_path: Path) -> None:
    """The README's two-node launch, with both "nodes" on this machine: the same `distill train` command twice,
    NNODES=2 and NODE_RANK 0 / 1, one process per node, runs/ shared as on a cluster filesystem."""
    import os
    import subprocess
    import sys

    from student.launch import free_port

    sft = {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3, "report_to": "none", "seed": 0}
    _, runs = make_run(tmp_path, addition_rows(48), {"model": str(tiny_model), "sft": sft, "accelerate": "ddp"})
    cluster = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"}
    cmd = [sys.executable, "-m", "distill.cli", "train", str(tmp_path / "st.yaml"), "--runs-dir", str(runs)]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env={**os.environ, **cluster, "NODE_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    assert "train: this share is done; the stage finishes when every share is" in logs[1]

    metrics = json.loads((runs / "st" / "train" / "metrics.json").read_text())
    processes = metrics["processes"]
    assert [(r["rank"], r["world_size"], r["should_save"]) for r in processes["ranks"]] == [
        (0, 2, True),
        (1, 2, False),
    ]
    assert [r["rows"] for r in processes["ranks"]] == [24, 24] and processes["rows_on_several_ranks"] == 0
    assert processes["rows_seen"] == 48 and metrics["global_step"] == 6 and metrics["epoch"] == pytest.approx(1.0)
    assert (runs / "st" / "train" / "model.safetensors").is_file()
    assert not list((runs / "st" / ".work").iterdir())  # node 0 swapped the stage in; node 1 removed its scratch


@pytest.mark.slow
def test_a_failed_launch_is_one_error_naming_the_first_ranks_exception_and_its_traceback(
    tiny_model: Path, tmp_path: Path, two_processes: None
) -> None:
    """Weights that only the launched processes read are broken: the stage's error names the rank, the exception
    and the file holding its traceback, instead of "see the log above" among every rank's interleaved output."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    sft = {"max_steps": 1, "per_device_train_batch_size": 4, "report_to": "none", "save_strategy": "no"}
    recipe, runs = make_run(tmp_path, addition_rows(8), {"model": str(broken), "sft": sft, "accelerate": "ddp"})
    with pytest.raises(DistillError) as failed:
        run(recipe, ctx=context(runs, recipe, tmp_path / "work"))
    message = str(failed.value)
    found = re.search(r"failed \(exit code 1\): rank-[01] raised (\w+): .+ \(traceback: (\S+)\)", message)
    assert found, message
    error, where = found.groups()
    recorded = Path(where).read_text()
    assert recorded.startswith(f"{error}: ") and "Traceback (most recent call last)" in recorded
    assert "safetensors" in recorded.lower(), recorded[-2000:]


def test_first_error_is_the_earliest_rank_to_fail_and_says_when_none_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert first_error(tmp_path).startswith("no process raised a Python error")
    for rank, exc in (("3", RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")), ("0", ConnectionError())):
        monkeypatch.setenv("RANK", rank)
        record_error(tmp_path, exc)
    later = (tmp_path / "errors" / "rank-3.txt").stat().st_mtime + 1
    os.utime(tmp_path / "errors" / "rank-0.txt", (later, later))  # file times tick coarsely: make the order plain
    assert first_error(tmp_path) == (
        "rank-3 raised RuntimeError: CUDA out of memory Tried to allocate 2 GiB "
        f"(traceback: {tmp_path / 'errors' / 'rank-3.txt'}); 1 other rank(s) failed after it"
    )
