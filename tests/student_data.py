"""Test helpers for the student stage: a synthetic kept set and a finished filter directory to train from.

The rows look like the filter's output (Trace fields + verdict + messages); the assistant turn is an R1-style
`<think>` block that adds two numbers digit by digit, then `\\boxed{N}`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from conftest import finish_stage
from distill import files
from distill.pipeline import StageContext, StageOptions
from distill.recipe import load_recipe
from distill.schema import Recipe
from student import template
from student.trainer import Plan

PROMPT = "What is {a} + {b}? Please reason step by step, and put your final answer within \\boxed{{}}."


def addition_row(a: int, b: int, *, system: str | None = None) -> dict[str, Any]:
    total = a + b
    reasoning = f"{a} + {b}: ones {a % 10} + {b % 10}, tens {a // 10 % 10} + {b // 10 % 10}. So {total}."
    completion = f"<think>\n{reasoning}\n</think>\n\n\\boxed{{{total}}}"
    prompt = [{"role": "user", "content": PROMPT.format(a=a, b=b)}]
    if system:
        prompt.insert(0, {"role": "system", "content": system})
    return {
        "id": f"add-{a}-{b}",
        "source": "synthetic",
        "kind": "math",
        "problem": f"{a} + {b}",
        "answer": str(total),
        "sample": 0,
        "prompt": prompt,
        "completion": completion,
        "reasoning": reasoning,
        "final": f"\\boxed{{{total}}}",
        "finish_reason": "stop",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "teacher": "synthetic",
        "sampling": {"temperature": 0.6},
        "verdict": {"correct": True, "reason": "ok"},
        "messages": [*prompt, {"role": "assistant", "content": completion}],
    }


def addition_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [addition_row(rng.randint(10, 999), rng.randint(10, 999)) for _ in range(n)]


def make_run(
    tmp: Path, rows: list[dict[str, Any]], student: dict[str, Any], *, name: str = "st"
) -> tuple[Recipe, Path]:
    """Write a recipe and a finished filter stage (kept.jsonl + manifest); returns the recipe and the runs dir."""
    runs = tmp / "runs"
    filter_dir = runs / name / "filter"
    files.write_jsonl(filter_dir / "kept.jsonl", rows)
    finish_stage(filter_dir, {"in": len(rows), "out": len(rows), "dropped": {}})
    recipe_path = tmp / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump({"name": name, "data": {"spec": "gsm8k"}, "student": student}))
    return load_recipe(recipe_path), runs


def context(runs: Path, recipe: Recipe, work: Path) -> StageContext:
    """A StageContext for calling `student.train.run` directly (the runner's work dir, made by hand)."""
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(runs / recipe.name, work, {"filter": runs / recipe.name / "filter"}, StageOptions())


# SFTConfig settings of a CPU training process (what the stage's CPU defaults give), for plans made by hand
CPU = {
    "assistant_only_loss": True,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "seed": 0,
}


def plan_for(
    model: Path, tmp: Path, *, rows: list[dict], sft: dict, peft: dict | None = None, quantization: str | None = None
) -> Plan:
    from transformers import AutoConfig, AutoTokenizer

    chat = template.resolve(
        AutoTokenizer.from_pretrained(model),
        model_type=AutoConfig.from_pretrained(model).model_type,
        path=None,
        assistant_only=True,
    )
    files.write_jsonl(tmp / "train.jsonl", ({"messages": r["messages"]} for r in rows))
    files.write_text(tmp / "template.jinja", chat.text)
    return Plan(
        model=str(model),
        data=str(tmp / "train.jsonl"),
        template=str(tmp / "template.jinja"),
        args={**CPU, "output_dir": str(tmp / "ckpt"), "eos_token": chat.end_of_turn, **sft},
        peft=peft,
        quantization=quantization,
        save_dir=str(tmp / "out"),
        scratch=str(tmp),
    )
