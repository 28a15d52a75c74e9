"""Build and run TRL's `SFTTrainer` (stage `train`) or `DistillationTrainer` (stage `onpolicy`) from a plan file.
Runs in the stage's own process, or on every process that `accelerate launch` starts (`student.launch`), so
everything it needs is in the plan, on disk.

Resume: checkpoints live in `sft.output_dir` inside the stage's work directory, which the runner keeps across a
killed run, so a rerun continues from the newest complete checkpoint (one whose trainer_state.json is readable;
the Trainer writes it last, so a checkpoint cut short by a kill is skipped). With several processes, the main
process alone picks it and tells the others (`agree_on_resume`), which also proves every node shares its work
directory: nodes that each decided for themselves would hang a run whose runs/ was copied rather than shared.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill import files
from distill.errors import DistillError
from student import arguments
from student.checkpoints import PushCheckpoints

log = logging.getLogger(__name__)
PLAN, RESULT = "plan.json", "result.json"


@dataclass(frozen=True)
class Plan:
    """Everything a training process needs. Written by the stage, read by each process."""

    model: str
    data: str  # JSONL of {"messages": [...]} rows (sft, already length-checked) or {"prompt": text} (distillation)
    template: str  # chat template file (with generation markers) set on the tokenizer
    # the final `trl.SFTConfig` / `trl.DistillationConfig` keyword arguments (`student.arguments.Kwargs.args`)
    args: dict[str, Any]
    peft: dict[str, Any] | None  # the final `peft.LoraConfig` keyword arguments, task_type included; None: no LoRA
    quantization: str | None
    save_dir: str  # where the trained model (or adapter) and tokenizer go
    scratch: str  # this node's folder for the plan and its data
    push_checkpoints: dict[str, Any] | None = None  # PushCheckpoints arguments (hub.push_checkpoints), or None
    # where result.json and the per-rank reports go (default: scratch). On a multi-node run, node 0's scratch: the
    # one folder every node reaches on the shared filesystem, so node 0 reads the reports of all ranks.
    reports: str | None = None
    # processes the launch must start in all (NNODES x NPROC_PER_NODE); None when training runs in the stage itself
    world_size: int | None = None
    trainer: str = "sft"  # "sft": SFTTrainer; "distillation": DistillationTrainer, on the student's own samples
    # distillation: {"model": path, "vocab_size": rows to keep} for a teacher beside the student, or {"server": url}
    teacher: dict[str, Any] | None = None

    @property
    def report_dir(self) -> Path:
        return Path(self.reports or self.scratch)

    def write(self, path: Path) -> None:
        files.write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> Plan:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def build_trainer(plan: Plan) -> Any:
    """The trainer for `plan`: the same call a bare TRL script makes, with our tokenizer template and data, and the
    configs built by `student.arguments` from exactly the keyword arguments the plan carries."""
    from transformers import AutoTokenizer

    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(plan.model)
    tokenizer.chat_template = Path(plan.template).read_text(encoding="utf-8")
    lora_where = "student.peft" if plan.trainer == "sft" else "onpolicy.peft"
    common = {
        "train_dataset": Dataset.from_list(list(files.read_jsonl(plan.data))),
        "processing_class": tokenizer,
        "peft_config": arguments.lora_config(plan.peft, where=lora_where) if plan.peft is not None else None,
        "quantization_config": quantization_config(plan.quantization, sft=plan.args),
        "callbacks": [PushCheckpoints(**plan.push_checkpoints)] if plan.push_checkpoints else None,
    }
    if plan.trainer == "distillation":
        return _distillation_trainer(plan, tokenizer=tokenizer, **common)
    from trl import SFTTrainer

    return SFTTrainer(model=plan.model, args=arguments.sft_config(plan.args), **common)


def _distillation_trainer(plan: Plan, *, tokenizer: Any, **common: Any) -> Any:
    """TRL's on-policy distillation: the student samples completions of the prompts, the teacher scores every token
    (in this process, or behind a vLLM server), the student lowers the divergence (`beta` 1.0: reverse KL)."""
    tokenizer.padding_side = "left"  # generation continues the prompts: pad on their left
    teacher = plan.teacher or {}
    if "server" in teacher:  # plan.args then carries teacher_model_server_url
        from trl.experimental.server_distillation import ServerDistillationTrainer

        args = arguments.distillation_config(plan.args, server=True)
        return ServerDistillationTrainer(model=plan.model, args=args, **common)
    from trl import DistillationTrainer

    # the teacher loads before the config is built: under accelerate's DeepSpeed ZeRO-3, building it sets the
    # weakref that makes every later from_pretrained partition its model
    return DistillationTrainer(
        model=plan.model,
        teacher_model=_teacher(teacher, args=plan.args),
        args=arguments.distillation_config(plan.args, server=False),
        **common,
    )


def _teacher(teacher: dict[str, Any], *, args: dict[str, Any]) -> Any:
    """The teacher model, its output rows cut to the student's vocabulary size when the two differ only by padding
    rows past the shared tokenizer (Qwen2.5 <= 3B have 151936 rows, 7B and up 152064): TRL compares `vocab_size`,
    and rows no token id reaches carry no probability worth keeping. `distill.vocab` decides it is only padding."""
    import torch
    from transformers import AutoModelForCausalLM

    init = dict(args.get("teacher_model_init_kwargs") or {})
    dtype = init.pop("dtype", "float32" if args.get("use_cpu") else "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(teacher["model"], dtype=getattr(torch, dtype), **init)
    rows = teacher.get("vocab_size")
    if rows is not None and rows != model.config.get_text_config().vocab_size:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return model


def quantization_config(quantization: str | None, *, sft: dict[str, Any]) -> Any:
    """QLoRA: NF4 base weights with double quantization (the QLoRA paper's settings), computing in the training
    precision: bf16, or fp16 when the recipe trains in fp16 (GPUs without bf16, such as T4 and V100)."""
    if quantization is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16 if sft.get("fp16") else torch.bfloat16,
    )


def last_checkpoint(output_dir: Path) -> Path | None:
    """Newest `checkpoint-N` whose trainer_state.json parses (the Trainer writes that file last)."""
    if not output_dir.is_dir():
        return None
    for path in sorted(output_dir.glob("checkpoint-*"), key=_step, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            log.warning("%s: incomplete checkpoint (killed while saving?), skipped", path)
            continue
        return path
    return None


def _step(path: Path) -> int:
    suffix = path.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def train(plan: Plan) -> dict[str, Any] | None:
    """Train (resuming when a checkpoint exists) and save on the main process. Returns the result on the main
    process (also written to `report_dir/result.json`), None on the others."""
    trainer = build_trainer(plan)
    accelerator = trainer.accelerator
    check_world_size(trainer.args.world_size, expected=plan.world_size)
    checkpoint = agree_on_resume(accelerator, plan)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    _report_rank(trainer, plan.report_dir)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    _report_sharding(trainer, plan.report_dir)
    trainer.save_model(plan.save_dir)  # writes on the process(es) with args.should_save only
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    pushes = [c for c in trainer.callback_handler.callbacks if isinstance(c, PushCheckpoints)]
    result = {
        "train_runtime": output.metrics.get("train_runtime"),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "log_history": trainer.state.log_history,
        "world_size": trainer.args.world_size,
        "resumed_from": checkpoint.name if checkpoint else None,
        "pushed_checkpoints": pushes[0].wait() if pushes else None,  # after the last collective: nobody waits
    }
    files.write_json(plan.report_dir / RESULT, result)
    return result


def check_world_size(actual: int, *, expected: int | None) -> None:
    """Fail before the first step when the launch did not make one world of every process: accelerate's default
    DeepSpeed launcher on several nodes (pdsh) starts one world per node, each training its own copy of the model
    on the same data while both rank 0s write the same files."""
    if expected is not None and actual != expected:
        raise DistillError(
            f"this process joined a world of {actual} processes, but the launch asked for {expected} "
            "(NNODES x NPROC_PER_NODE): each group would train its own copy of the model on the same data. For "
            "DeepSpeed on several nodes set deepspeed_config.deepspeed_multinode_launcher: standard"
        )


def agree_on_resume(accelerator: Any, plan: Plan) -> Path | None:
    """The checkpoint every process resumes from, picked by the main process alone. It writes its pick under a
    fresh name into the report directory (node 0's work directory) and broadcasts it; the first process of each
    node reads it back from its own view of that directory, so a node whose runs/ is not node 0's fails here, with
    every rank, instead of resuming differently and hanging. A fresh file name means no node has a cached "no such
    file" for it (NFS caches negative lookups)."""
    output_dir = Path(plan.args["output_dir"])
    if accelerator.num_processes == 1:
        return last_checkpoint(output_dir)
    from accelerate.utils import broadcast_object_list, gather_object

    choice: list[Any] = [None]
    if accelerator.is_main_process:
        found = last_checkpoint(output_dir)
        choice = [{"marker": f"node0-{secrets.token_hex(8)}.json", "resume": found.name if found else None}]
        files.write_json(plan.report_dir / choice[0]["marker"], choice[0])
    broadcast_object_list(choice)
    marker = plan.report_dir / choice[0]["marker"]
    shared = True
    if accelerator.is_local_main_process:
        try:
            shared = json.loads(marker.read_text(encoding="utf-8")) == choice[0]
        except (OSError, json.JSONDecodeError):
            shared = False
    node = int(os.environ.get("NODE_RANK", "0"))
    blind = sorted({rank for rank, ok in gather_object([(node, shared)]) if not ok})
    if blind:
        raise DistillError(
            f"node(s) {', '.join(map(str, blind))} cannot see node 0's work directory ({marker.parent} has no "
            f"{marker.name}): runs/ must be one directory on a filesystem every node shares (the same path, or "
            "--runs-dir), since node 0 keeps the checkpoints, the resume point and the rank reports there"
        )
    return output_dir / choice[0]["resume"] if choice[0]["resume"] else None


def _report_sharding(trainer: Any, scratch: Path) -> None:
    """With several processes, each one records how it ran and which share of the weights it holds after training:
    1/world_size under FSDP or ZeRO-3 (proof the config really shards), all of them under DDP."""
    if trainer.args.world_size <= 1:
        return
    files.write_json(
        scratch / f"weights-{trainer.args.process_index}.json",
        {"distributed_type": str(trainer.accelerator.distributed_type), "weights_held": weights_held(trainer.model)},
    )


def weights_held(model: Any) -> float:
    """The share of the model's parameters this process holds, to 4 places."""
    local = full = 0
    for param in model.parameters():
        to_local = getattr(param, "to_local", None)  # FSDP2 parameters are DTensors: numel() is the global size
        zero3 = getattr(param, "ds_numel", None)  # DeepSpeed ZeRO-3 keeps the full size here, a shard in ds_tensor
        full += zero3 or param.numel()
        local += to_local().numel() if to_local else param.ds_tensor.numel() if zero3 else param.numel()
    return round(local / full, 4)


def _report_rank(trainer: Any, scratch: Path) -> None:
    """With several processes, each one records what it is and which rows it trains on in the first epoch (the
    sampler is seeded, so this is the order training uses): proof that data parallelism is real, not N copies."""
    args = trainer.args
    if args.world_size <= 1:
        return
    import torch.distributed as dist

    sampler = trainer.get_train_dataloader().batch_sampler
    rows = [int(i) for batch in sampler for i in batch]
    files.write_json(
        scratch / f"rank-{args.process_index}.json",
        {
            "rank": args.process_index,
            "world_size": args.world_size,
            "pid": os.getpid(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "parallel_mode": str(args.parallel_mode),
            "device": str(args.device),
            "should_save": args.should_save,
            "rows": rows,
        },
    )
