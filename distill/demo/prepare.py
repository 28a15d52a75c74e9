"""`distill demo prepare`: the demo's problems and models, written where `recipes/demo.yaml` points.

- `data[0].path`: the distillation problems the teacher answers (`{"problem", "answer"}` JSON Lines);
- `eval.benchmarks[0].path`: held-out problems, disjoint from every other split;
- `student.model`: a random-init tiny Qwen2 (the "untrained" row of the report);
- `teacher.model`: the same architecture family, SFT-trained briefly on gold chain-of-thought traces of a third,
  disjoint split, so it is good but imperfect: at temperature > 0 some of its traces are wrong, which is what
  the filter is for.

All of it is deterministic in the settings, and a stamp file (`demo.json` in the teacher folder) records them: a
rerun with the same settings returns in milliseconds, a changed setting rebuilds everything.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill import files
from distill.demo.task import Addition, sample_problems
from distill.errors import RecipeError
from distill.manifest import canonical_hash
from distill.schema import KIND_PROMPTS, Recipe

log = logging.getLogger(__name__)
STAMP = "demo.json"
HELDOUT_SEED, DISTILL_SEED, TEACHER_SEED = 1, 2, 3  # one seed per split; `sample_problems` keeps them disjoint


@dataclass(frozen=True)
class Settings:
    """What `prepare` builds. Defaults: the measured configuration of `recipes/demo.yaml` (see its header)."""

    problems: int = 2000  # distillation problems written (the recipe's `data[0].limit` may use fewer)
    heldout: int = 200  # held-out problems written (`eval.benchmarks[0].limit` may use fewer)
    teacher_problems: int = 4000  # gold-trace problems the teacher is trained on
    teacher_steps: int = 800  # SFT steps of the teacher: fewer give a weaker teacher (more for the filter to do)
    teacher_hidden: int = 128  # hidden size; head_dim = hidden / heads must stay >= 32 for vLLM on CPU
    teacher_layers: int = 2
    teacher_heads: int = 4  # 4 heads learn the task reliably in 800 steps; 2 (hidden 64) stalled on some seeds
    student_hidden: int = 128  # a fresh model of the teacher's size: smaller ones learn too unreliably here
    student_layers: int = 2
    student_heads: int = 4
    vocab_size: int = 400  # byte-level BPE; digits stay single tokens whatever the size
    learning_rate: float = 3e-3  # the teacher's (the students' is `student.sft.learning_rate`)
    batch_size: int = 8
    seed: int = 0


def prepare(recipe: Recipe, *, settings: Settings, progress: bool) -> dict[str, Any]:
    """Write problems and models where the recipe reads them; returns the stamp (settings, sizes, wall times)."""
    paths = _paths(recipe)
    stamp_path = paths["teacher"] / STAMP
    key = canonical_hash({"settings": asdict(settings), "paths": {k: str(v) for k, v in paths.items()}})
    if stamp_path.is_file() and files.read_json(stamp_path).get("key") == key:
        log.info("demo prepare: cached (%s matches the settings)", stamp_path)
        return files.read_json(stamp_path)
    t0 = time.monotonic()
    heldout = sample_problems(settings.heldout, seed=HELDOUT_SEED + settings.seed)
    distill = sample_problems(settings.problems, seed=DISTILL_SEED + settings.seed, exclude=_numbers(heldout))
    gold = sample_problems(
        settings.teacher_problems, seed=TEACHER_SEED + settings.seed, exclude=_numbers(heldout) | _numbers(distill)
    )
    files.write_jsonl(paths["problems"], (_row(p) for p in distill))
    files.write_jsonl(paths["heldout"], (_row(p) for p in heldout))
    rows = [gold_messages(p, prompt=recipe.teacher.prompt or KIND_PROMPTS["math"]) for p in gold]
    corpus = [m["content"] for row in rows[:2000] for m in row["messages"]]
    t1 = time.monotonic()
    _build_base(paths["student"], corpus=corpus, settings=settings, teacher=False)
    teacher_base = paths["teacher"].with_name(paths["teacher"].name + ".base")
    _build_base(teacher_base, corpus=corpus, settings=settings, teacher=True)
    t2 = time.monotonic()
    from distill.demo.tiny_teacher import train_teacher

    trained = train_teacher(teacher_base, rows, out=paths["teacher"], settings=settings, progress=progress)
    shutil.rmtree(teacher_base)
    stamp = {
        "key": key,
        "settings": asdict(settings),
        "splits": {"distill": len(distill), "heldout": len(heldout), "teacher_gold": len(gold)},
        "wall_s": {"data": round(t1 - t0, 2), "models": round(t2 - t1, 2), "teacher_sft": trained["train_runtime"]},
        "teacher": trained,
    }
    files.write_json(stamp_path, stamp)
    log.info("demo prepare: %s", stamp["wall_s"])
    return stamp


def gold_messages(problem: Addition, *, prompt: str) -> dict[str, Any]:
    """A gold SFT row in the layout the teacher will be prompted with (R1 prompt, `<think>` first)."""
    return {
        "messages": [
            {"role": "user", "content": prompt.format(problem=problem.text)},
            {"role": "assistant", "content": problem.completion()},
        ]
    }


def _paths(recipe: Recipe) -> dict[str, Path]:
    """Where the recipe reads the demo's files; each must be a local path for `prepare` to write."""
    where = {
        "problems": recipe.data[0].path if recipe.data else None,
        "heldout": recipe.eval.benchmarks[0].path if recipe.eval and recipe.eval.benchmarks else None,
        "teacher": recipe.teacher.model if recipe.teacher else None,
        "student": recipe.student.model if recipe.student else None,
    }
    keys = {
        "problems": "data[0].path",
        "heldout": "eval.benchmarks[0].path",
        "teacher": "teacher.model",
        "student": "student.model",
    }
    missing = [keys[k] for k, v in where.items() if not v]
    if missing:
        raise RecipeError(f"demo prepare: the recipe must set {', '.join(missing)} (local paths it writes to)")
    return {k: Path(v) for k, v in where.items()}


def _numbers(problems: list[Addition]) -> set[tuple[int, ...]]:
    return {p.numbers for p in problems}


def _row(problem: Addition) -> dict[str, str]:
    return {"problem": problem.text, "answer": problem.answer}


def _build_base(out: Path, *, corpus: list[str], settings: Settings, teacher: bool) -> None:
    """A random-init model with the demo tokenizer (trained on the gold traces, so both models share it)."""
    from distill.tinymodel import build_tiny_model

    prefix = "teacher" if teacher else "student"
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(f".{out.name}{files.TMP_MARK}{os.getpid()}")
    build_tiny_model(
        tmp,
        hidden_size=getattr(settings, f"{prefix}_hidden"),
        layers=getattr(settings, f"{prefix}_layers"),
        heads=getattr(settings, f"{prefix}_heads"),
        vocab_size=settings.vocab_size,
        corpus=corpus,
        seed=settings.seed,
    )
    os.replace(tmp, out)
