"""The demo's teacher: a tiny model SFT-trained on gold chain-of-thought traces with TRL, briefly on purpose.

It plays DeepSeek-R1's part in the demo: a model that reasons in `<think>` and answers in `\\boxed{}`, right most of
the time at temperature > 0 but not always. Its training is the plain TRL recipe the student stage also uses
(assistant-only loss, fp32 on CPU), and its `trl.SFTConfig` comes the student's way: `student.arguments.decide`
adds the checkpoint folder, progress and the CPU defaults, `student.arguments.sft_config` builds it. The budget
(`Settings.teacher_steps`) sets how imperfect it is.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from distill import files

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# recipes/demo.yaml's student.sft schedule; the teacher's budget, rate and seed come from `Settings`
SCHEDULE = {
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "assistant_only_loss": True,
    "max_length": None,  # gold rows are never cut
    "use_cpu": True,  # on every machine: the demo's models are built and compared on CPU
    "save_strategy": "no",
    "report_to": "none",
}


def sft_kwargs(settings: Any, *, output_dir: Path, progress: bool) -> dict[str, Any]:
    """The teacher's `trl.SFTConfig` keyword arguments, decided as the train stage decides a student's on CPU."""
    from trl import SFTConfig

    from student import arguments

    values = {
        "max_steps": settings.teacher_steps,
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        **SCHEDULE,
        "logging_steps": max(1, settings.teacher_steps // 10),
        "seed": settings.seed,
    }
    decided = arguments.decide(
        values,
        stage="demo prepare",
        where="demo teacher",
        config_class=SFTConfig,
        output_dir=output_dir,
        on_gpu=False,
        progress=progress,
        peft=None,
        launcher=None,
    )
    return decided.finish(peft=None).args


def train_teacher(
    base: Path, rows: list[dict[str, Any]], *, out: Path, settings: Any, progress: bool
) -> dict[str, Any]:
    """Fine-tune `base` on `rows` (`{"messages": [...]}`) and write the model folder to `out` atomically."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from datasets import Dataset
    from student import arguments

    tmp = out.with_name(f".{out.name}{files.TMP_MARK}{os.getpid()}")
    kwargs = sft_kwargs(settings, output_dir=tmp / "checkpoints", progress=progress)
    config = arguments.sft_config(kwargs, where="demo teacher")
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = SFTTrainer(
        model=str(base), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    log.info("demo teacher: %d gold traces, %d steps of %d", len(rows), settings.teacher_steps, settings.batch_size)
    output = trainer.train()
    trainer.save_model(str(tmp))
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    for name in TOKENIZER_FILES:  # the base's files as built: pinned tokenizer class, end-of-turn EOS
        if (base / name).is_file():
            shutil.copy2(base / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "train_runtime": round(output.metrics["train_runtime"], 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
