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
of all nodes (tested with two "nodes" on one machine: tests/test_student_ddp.py).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from distill.errors import DistillError, RecipeError

log = logging.getLogger(__name__)
CONFIGS = Path("recipes") / "accelerate"
REPO_CONFIGS = Path(__file__).resolve().parent.parent / CONFIGS


def config_file(name: str) -> Path:
    """`student.accelerate`: a path to an accelerate config, or a name in recipes/accelerate/ (cwd, then repo)."""
    for path in (Path(name), CONFIGS / f"{name}.yaml", REPO_CONFIGS / f"{name}.yaml"):
        if path.is_file():
            return path
    known = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))
    raise RecipeError(f"student.accelerate: {name!r} is neither a file nor one of {', '.join(known)}")


def check_backend(name: str) -> Path:
    """The config file of `student.accelerate`, refused before any work when it needs a package that is missing
    (DeepSpeed comes with the `gpu` and `dev` extras): better one error now than one per launched process later."""
    import importlib.util

    from distill.recipe import read_yaml

    config = config_file(name)
    if read_yaml(config).get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            f"student.accelerate: {name} ({config}) uses DeepSpeed, which is not installed; pip install deepspeed "
            "(the gpu extra has it) or use ddp / fsdp"
        )
    return config


def machine_rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("NODE_RANK", "0"))


def command(config: Path, *, plan: Path, env: Mapping[str, str] = os.environ) -> list[str]:
    """The `accelerate launch` command line for this machine (see the module docstring for the variables)."""
    import torch

    nnodes = int(env.get("NNODES", "1"))
    per_node = int(env.get("NPROC_PER_NODE") or torch.cuda.device_count() or 1)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(nnodes * per_node),
        "--num_machines",
        str(nnodes),
    ]
    if nnodes > 1:
        if "MASTER_ADDR" not in env:
            raise DistillError(f"NNODES={nnodes}: set MASTER_ADDR (and NODE_RANK) on every node")
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


def launch(config: Path, *, plan: Path) -> None:
    """Run the launcher and wait; a failed launch is an error with the exit code (its output went to the log)."""
    cmd = command(config, plan=plan)
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise DistillError(f"training launched with {config} failed (exit code {proc.returncode}); see the log above")


def main(argv: list[str] | None = None) -> int:
    from student.trainer import Plan, train

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(Plan.read(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
