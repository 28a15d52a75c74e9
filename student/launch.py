"""Multi-process and multi-node training through `accelerate launch`.

When `student.accelerate` names a launcher config, the stage runs

    accelerate launch --config_file recipes/accelerate/<name>.yaml --num_processes N --num_machines M \\
        [--machine_rank R --main_process_ip ADDR --main_process_port PORT] -m student.launch PLAN

and each process runs `student.trainer.train(PLAN)`. Machine count, rank and main address come from the standard
launcher variables in the environment, never from the recipe or the config file:

- `NNODES` (default 1), `NODE_RANK` (default 0), `MASTER_ADDR`, `MASTER_PORT` (default 29500 when NNODES > 1, a
  free local port otherwise);
- `NPROC_PER_NODE` (default: the number of visible CUDA devices, or 1 without any).

Two nodes under Slurm (one task per node; the same command on both; runs/ on a shared filesystem):

    #!/bin/bash
    #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
    export NNODES=$SLURM_NNODES MASTER_PORT=29500
    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun bash -c 'NODE_RANK=$SLURM_NODEID distill train recipes/my-recipe.yaml'

Node 0 writes the model and finishes the stage (manifest, swap into runs/<name>/train); the other nodes train and
return without finishing it. Every rank reports into node 0's scratch folder, so train/metrics.json lists the ranks
of all nodes (tested with two "nodes" on one machine: tests/test_student_ddp.py). Before the first step every
process checks that the world it joined has NNODES x NPROC_PER_NODE ranks and that every node sees node 0's work
directory (`student.trainer`): a launcher that starts one world per node, or a runs/ that is not shared, fails there
instead of training N unrelated copies.

The config file is read here and written, as resolved for the run, beside the plan: DeepSpeed configs must use the
`standard` multi-node launcher (accelerate's default, pdsh, starts DeepSpeed on the local node only), and under FSDP
activation checkpointing is FSDP's own (`resolve_checkpointing`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill import files
from distill.errors import DistillError, RecipeError
from distill.shipped import CHECKOUT, LAUNCHERS

log = logging.getLogger(__name__)
REPO_CONFIGS = CHECKOUT / LAUNCHERS.folder  # the checkout's own configs; lookups go through LAUNCHERS.find
ERRORS = "errors"  # per-rank error files in the plan's report dir (`record_error`)
STANDARD = "standard"  # accelerate's torchrun-style DeepSpeed launcher: one launcher per node, one world


@dataclasses.dataclass(frozen=True)
class Launcher:
    """`student.accelerate` read: the name as written, its file, and its settings as this run uses them."""

    name: str
    path: Path
    settings: dict[str, Any]

    @property
    def distributed_type(self) -> str:
        return str(self.settings.get("distributed_type", ""))

    @property
    def gpu_only(self) -> str | None:
        """How the config says it wants GPUs (DeepSpeed, FSDP), for the refusal to train on CPU by accident."""
        kind = self.distributed_type
        return f"student.accelerate: {self.name} ({kind})" if kind in ("DEEPSPEED", "FSDP") else None


def config_file(name: str) -> Path:
    """`student.accelerate`: a path to an accelerate config, or a name in recipes/accelerate/ of the cwd, the
    checkout, then the installed package (`distill.shipped`)."""
    path = LAUNCHERS.find(name)
    if path is None:
        known = ", ".join(LAUNCHERS.names())
        raise RecipeError(f"student.accelerate: {name!r} is neither a file nor one of {known}")
    return path


def load(name: str, *, env: Mapping[str, str] = os.environ) -> Launcher:
    """The launcher config of `student.accelerate`, refused before any work when it cannot run as asked: DeepSpeed
    not installed (the `gpu` and `dev` extras have it), or DeepSpeed on several nodes without the standard launcher.
    Better one error now than one per launched process, or two unrelated 8-GPU jobs, later."""
    import importlib.util

    from distill.recipe import read_yaml

    path = config_file(name)
    launcher = Launcher(name=name, path=path, settings=read_yaml(path))
    if launcher.distributed_type != "DEEPSPEED":
        return launcher
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            f"student.accelerate: {name} ({path}) uses DeepSpeed, which is not installed; pip install deepspeed "
            "(the gpu extra has it) or use ddp / fsdp"
        )
    multinode = (launcher.settings.get("deepspeed_config") or {}).get("deepspeed_multinode_launcher")
    if nodes(env) > 1 and multinode != STANDARD:
        raise RecipeError(
            f"student.accelerate: {name} ({path}) runs DeepSpeed on {nodes(env)} nodes with the "
            f"{multinode or 'default (pdsh)'} launcher, which starts DeepSpeed on the local node only, so each node "
            "would train its own copy; set deepspeed_config.deepspeed_multinode_launcher: standard"
        )
    return launcher


def resolve_checkpointing(launcher: Launcher, *, sft: dict[str, Any], default: bool) -> tuple[Launcher, str | None]:
    """Under FSDP, activation checkpointing must be FSDP's (`fsdp_activation_checkpointing`): transformers refuses
    it together with `gradient_checkpointing` at start-up, on GPUs only, and the latter costs an extra all-gather
    per layer. Checkpointing asked for in either place (`student.sft.gradient_checkpointing`, `default` when unset,
    or the config) becomes FSDP's; `sft` is updated in place. Returns the launcher as resolved and what was done."""
    if launcher.distributed_type != "FSDP":
        return launcher, None
    fsdp = dict(launcher.settings.get("fsdp_config") or {})
    in_config = bool(fsdp.get("fsdp_activation_checkpointing"))
    in_sft = bool(sft.get("gradient_checkpointing", default))
    sft["gradient_checkpointing"] = False
    if not (in_config or in_sft):
        return launcher, None
    fsdp["fsdp_activation_checkpointing"] = True
    settings = {**launcher.settings, "fsdp_config": fsdp}
    asked = "student.sft.gradient_checkpointing" if in_sft else f"{launcher.name}'s fsdp_activation_checkpointing"
    note = f"activation checkpointing ({asked}) runs as FSDP's fsdp_activation_checkpointing"
    return dataclasses.replace(launcher, settings=settings), note


def scratch_dir(work_dir: Path, *, name: str) -> Path:
    """A fresh, empty scratch folder for this node. Node 0 keeps it inside the work dir (deleted before the swap);
    other nodes of a multi-node run use a sibling folder, so on a shared filesystem no node deletes a plan that
    another node's processes still read."""
    rank = machine_rank()
    scratch = work_dir / name if rank == 0 else work_dir.with_name(f"{work_dir.name}{name}-node{rank}")
    if scratch.exists():
        shutil.rmtree(scratch)
    return scratch


def machine_rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("NODE_RANK", "0"))


def nodes(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("NNODES", "1"))


def world_size(env: Mapping[str, str] = os.environ) -> int:
    """The processes the run must have in all: NNODES x NPROC_PER_NODE (default: the visible CUDA devices, or 1)."""
    import torch

    return nodes(env) * int(env.get("NPROC_PER_NODE") or torch.cuda.device_count() or 1)


def command(config: Path, *, plan: Path, env: Mapping[str, str] = os.environ) -> list[str]:
    """The `accelerate launch` command line for this machine (see the module docstring for the variables)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(world_size(env)),
        "--num_machines",
        str(nodes(env)),
    ]
    if nodes(env) > 1:
        if "MASTER_ADDR" not in env:
            raise DistillError(f"NNODES={nodes(env)}: set MASTER_ADDR (and NODE_RANK) on every node")
        cmd += [
            "--machine_rank",
            str(machine_rank(env)),
            "--main_process_ip",
            env["MASTER_ADDR"],
            "--main_process_port",
            env.get("MASTER_PORT", "29500"),
        ]
    else:
        cmd += ["--main_process_port", env.get("MASTER_PORT") or str(free_port())]
    return [*cmd, "-m", "student.launch", str(plan)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: Launcher, *, config: Path, plan: Path, reports: Path) -> None:
    """Run the launcher on `config` (the launcher's settings as written for this run) and wait. A failed launch is
    one error with the exit code and the first Python error any rank recorded in `reports` (the plan's report
    dir, which every node reaches): among 2 x 8 interleaved logs, the root cause is otherwise hard to find."""
    cmd = command(config, plan=plan)
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise DistillError(
            f"training launched with student.accelerate {launcher.name} ({launcher.path}) failed (exit code "
            f"{proc.returncode}): {first_error(reports)}"
        )


def first_error(reports: Path) -> str:
    """The first error a rank recorded (`record_error`): later ones are usually its echo on the other ranks (a
    closed connection, a timed-out collective)."""
    recorded = sorted((reports / ERRORS).glob("rank-*.txt"), key=lambda path: path.stat().st_mtime_ns)
    if not recorded:
        return (
            "no process raised a Python error (killed, out of memory, or crashed outside Python?); see the log above"
        )
    first = recorded[0]
    summary = first.read_text(encoding="utf-8").partition("\n")[0]
    others = f"; {len(recorded) - 1} other rank(s) failed after it" if len(recorded) > 1 else ""
    return f"{first.stem} raised {summary} (traceback: {first}){others}"


def record_error(reports: Path, exc: BaseException) -> None:
    """Write this rank's error, summary line first, then the traceback, for `first_error` in the launching stage."""
    rank = os.environ.get("RANK", "0")
    detail = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    files.write_text(reports / ERRORS / f"rank-{rank}.txt", f"{summary}\n\n{detail}")


def main(argv: list[str] | None = None) -> int:
    """One training process: train the plan, record any error for the launching stage, and leave the process
    group after a clean run (PyTorch asks for it; without it NCCL warns and may hang at interpreter shutdown). A
    failed rank just exits: the launcher stops the others."""
    from student.trainer import Plan, train

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.read(Path(args[0]))
    try:
        train(plan)
        leave_process_group()
    except DistillError as exc:  # one line per process instead of a traceback per rank
        log.error("%s", exc)
        record_error(plan.report_dir, exc)
        return 1
    except Exception as exc:
        record_error(plan.report_dir, exc)
        raise
    return 0


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """End a rank whose work is written and whose process group is left, skipping the interpreter's teardown.
    Twice in CI a finished ZeRO-3 rank then died in native code ("terminate called without an active exception",
    SIGABRT, after its model shards were written), and the launch failed with no Python error. Nothing the rank
    wrote is lost: outputs are written and renamed before this, and the logs are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
