"""Tiny models and recipes for the onpolicy stage's tests: a student, teachers sharing its tokenizer (one with padded
embedding rows) and one with a tokenizer of its own, a recipe over additions, and a train stage finished by hand."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import finish_stage
from distill import files, vocab
from distill.tinymodel import build_tiny_model
from student.trainer import Plan

ROOT = Path(__file__).resolve().parents[1]
# DistillationConfig as the stage resolves it on CPU, for plans made by hand
CPU = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False, "report_to": "none", "seed": 0}
FAST = {"per_device_train_batch_size": 4, "max_completion_length": 16, "learning_rate": 1e-3, "logging_steps": 1}


def build_models(root: Path) -> dict[str, Path]:
    """A student and teachers sharing its tokenizer (one with padded embedding rows, as Qwen2.5-7B pads to 152064
    where 1.5B has 151936), and one with a tokenizer of its own."""
    student = build_tiny_model(root / "student", seed=0)
    rows = json.loads((student / "config.json").read_text())["vocab_size"]
    return {
        "student": student,
        "teacher": build_tiny_model(root / "teacher", seed=1),
        "padded": build_tiny_model(root / "padded", seed=2, vocab_rows=rows + 61),
        "foreign": build_tiny_model(root / "foreign", seed=3, corpus=["completely different words only"] * 3),
    }


def prompts_file(tmp: Path, tokenizer_dir: Path, n: int = 8) -> Path:
    from transformers import AutoTokenizer

    from distill.prompts import generation_prompt

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        chat = [{"role": "user", "content": f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"}]
        rows.append({"prompt": generation_prompt(tokenizer, chat, think_prefix="<think>\n")})
    files.write_jsonl(tmp / "prompts.jsonl", rows)
    return tmp / "prompts.jsonl"


def distillation_plan(models: dict[str, Path], tmp: Path, *, teacher: str) -> Plan:
    from transformers import AutoTokenizer

    template = tmp / "template.jinja"
    files.write_text(template, AutoTokenizer.from_pretrained(models["student"]).chat_template)
    pairing = vocab.load_pairing(str(models["student"]), str(models[teacher]), server=False, offline=True)
    return Plan(
        model=str(models["student"]),
        data=str(prompts_file(tmp, models["student"])),
        template=str(template),
        args={**CPU, **FAST, "output_dir": str(tmp / "ckpt"), "max_steps": 1},
        peft=None,
        quantization=None,
        save_dir=str(tmp / "out"),
        scratch=str(tmp),
        trainer="distillation",
        teacher={"model": str(models[teacher]), "vocab_size": pairing.rows_for_teacher},
    )


def reverse_kl(trainer, inputs) -> float:
    """KL(student || teacher) per completion token, computed here from both models' logits."""
    import torch

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logits = [
            m(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
            for m in (trainer.model, trainer.teacher_model)
        ]
    student, teacher = (torch.log_softmax(x.float(), dim=-1) for x in logits)
    per_token = (student.exp() * (student - teacher)).sum(-1)
    valid = inputs["completion_mask"].bool()
    return float(per_token[valid].mean())


def onpolicy_recipe(
    tmp: Path, models: dict[str, Path], *, teacher: Path | None = None, config: dict | None = None
) -> Path:
    """A recipe whose train stage is the tiny student (finished by hand) and whose problems are additions."""
    rng = random.Random(0)
    problems = tmp / "problems.jsonl"
    rows = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(24)]
    files.write_jsonl(
        problems, ({"id": f"p{i}", "problem": f"{a} + {b}", "answer": str(a + b)} for i, (a, b) in enumerate(rows))
    )
    onpolicy = {"config": {**FAST, "report_to": "none", "max_steps": 6, "save_steps": 2, **(config or {})}}
    if teacher is not None:
        onpolicy["teacher"] = str(teacher)
    recipe = {
        "name": "op",
        "data": {"spec": "local_jsonl", "path": str(problems)},
        "teacher": {"model": str(models["padded"])},
        "student": {"model": str(models["student"])},
        "onpolicy": onpolicy,
    }
    path = tmp / "op.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def finished_train(runs: Path, models: dict[str, Path], *, seed: int = 0) -> Path:
    train = runs / "op" / "train"
    if train.exists():
        shutil.rmtree(train)
    shutil.copytree(models["student"], train)
    (train / "marker.txt").write_text(f"seed {seed}")  # a different train output, as a re-run of train would be
    finish_stage(train, {"in": 1, "out": 1, "dropped": {}})
    return train


def distill_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )
