"""Benchmark the student stage against a bare TRL script, on the same tiny model, data and settings.

    OMP_NUM_THREADS=1 .venv/bin/python bench/student.py [--rows 512] [--steps 400] [--rounds 5] [--quick]

1. Throughput: train tokens/s of `student.train.run` (the whole stage: checks, length fitting, trainer, outputs)
   measured over its training loop, versus `SFTTrainer(...).train()` written by hand. Tokens are the (unpadded)
   tokens of the rows trained (prompt and reply), counted independently for each (the bare run counts its own
   tokenized dataset).
   Rounds interleave the two sides after a warm-up (bench/harness.py: ABBA order); the ratio is the median of the
   per-round ratios, with its spread, since the cores are shared and single runs swing by 20%. Target: ratio >= 0.95.
   The wall time of each whole call (start-up and the stage's checks/outputs included) is reported beside it.
   `--quick`: 10 steps, one round.
2. Useful tokens: the share of non-padding tokens in the batches our trainer collates with packing (bfd) and with
   padding-free batching, against plain padded batches for reference. Target: >= 0.9.

Last line: {"bench": "student", "ratio_vs_raw": ..., "spread": [min, max], "rounds": ..., "load_avg": [start, end],
"useful_token_ratio": ..., "target": {...}, ...}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from distill import files
from distill.manifest import Manifest, write_manifest
from distill.pipeline import StageContext, StageOptions
from distill.schema import Recipe
from distill.tinymodel import build_tiny_model

# This file is named like the package it measures: drop its folder from the path so `import student` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
_spec = importlib.util.spec_from_file_location("bench_harness", Path(__file__).with_name("harness.py"))
harness = sys.modules.setdefault("bench_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)

SETTINGS = {
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "max_length": 256,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "assistant_only_loss": True,
    "disable_tqdm": True,
}


def rows(n: int, seed: int = 0) -> list[dict]:
    """Addition problems with a short R1-style trace, in the filter's kept.jsonl shape (messages is what matters)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        steps = " ".join(f"{x} + {y} = {x + y}." for x, y in zip(str(a), str(b), strict=False))
        prompt = f"What is {a} + {b}? Please reason step by step, and put your final answer within \\boxed{{}}."
        reply = f"<think>\n{steps} So the sum is {a + b}.\n</think>\n\n\\boxed{{{a + b}}}"
        out.append(
            {"id": f"b{i}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
        )
    return out


def stage_run(model: Path, data: list[dict], tmp: Path, steps: int) -> float:
    from student.train import run

    runs = tmp / "runs"
    filter_dir = runs / "bench" / "filter"
    files.write_jsonl(filter_dir / "kept.jsonl", data)
    write_manifest(
        filter_dir,
        Manifest(
            stage="filter",
            recipe="bench",
            section_hash="",
            input_hash="",
            output_hash="",
            counts={},
            started_at="",
            finished_at="",
            wall_s=0.0,
        ),
    )
    recipe = Recipe.model_validate(
        {
            "name": "bench",
            "data": {"spec": "gsm8k"},
            "student": {"model": str(model), "sft": {**SETTINGS, "max_steps": steps}},
        }
    )
    work = tmp / "work"
    run(recipe, ctx=StageContext(runs / "bench", work, {"filter": filter_dir}, StageOptions(progress=False)))
    metrics = json.loads((work / "metrics.json").read_text())
    print(f"stage: {metrics['train_tokens_per_epoch']:,} tokens per epoch", file=sys.stderr)
    return metrics["train_tokens"] / metrics["train_runtime_s"]


def raw_run(model: Path, data: list[dict], tmp: Path, steps: int) -> float:
    """What a user would write with TRL alone."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    trainer = SFTTrainer(
        model=str(model),
        args=SFTConfig(output_dir=str(tmp / "raw"), max_steps=steps, **SETTINGS),
        train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in data]),
        processing_class=AutoTokenizer.from_pretrained(model),
    )
    output = trainer.train()
    per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    print(f"raw: {per_epoch:,} tokens per epoch", file=sys.stderr)
    tokens = per_epoch * trainer.state.epoch
    return tokens / output.metrics["train_runtime"]


def useful_ratio(model: Path, data: list[dict], tmp: Path, sft: dict) -> float:
    """Non-padding share of the tokens in every batch of one epoch, as our trainer collates them."""
    from transformers import AutoConfig, AutoTokenizer

    from student import template
    from student.trainer import Plan, build_trainer

    chat = template.resolve(
        AutoTokenizer.from_pretrained(model),
        model_type=AutoConfig.from_pretrained(model).model_type,
        path=None,
        assistant_only=True,
    )
    files.write_jsonl(tmp / "data.jsonl", ({"messages": r["messages"]} for r in data))
    files.write_text(tmp / "template.jinja", chat.text)
    plan = Plan(
        model=str(model),
        data=str(tmp / "data.jsonl"),
        template=str(tmp / "template.jinja"),
        args={**SETTINGS, **sft, "output_dir": str(tmp / "u"), "eos_token": chat.end_of_turn},
        peft=None,
        quantization=None,
        save_dir=str(tmp / "u"),
        scratch=str(tmp),
    )
    real = total = 0
    for batch in build_trainer(plan).get_train_dataloader():
        ids = batch["input_ids"]
        total += ids.numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
    return real / total


def timed(runner: Callable[..., float], model: Path, data: list[dict], tmp: Path, steps: int) -> Callable[[], dict]:
    """One side of the comparison: a fresh folder per call; tokens/s of the loop, and the whole call's seconds."""
    calls = [0]

    def side() -> dict[str, float]:
        calls[0] += 1
        t0 = time.monotonic()
        rate = runner(model, data, tmp / f"{runner.__name__}{calls[0]}", steps)
        return {"tok_s": rate, "wall_s": time.monotonic() - t0}

    return side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400)
    harness.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 10)
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-student-"))
    model = build_tiny_model(tmp / "tiny")
    data = rows(args.rows)
    result = harness.compare(
        timed(stage_run, model, data, tmp, args.steps),
        timed(raw_run, model, data, tmp, args.steps),
        rounds=harness.rounds_of(args),
        quick=args.quick,
    )
    ratios = {
        name: useful_ratio(model, data, tmp / name, sft)
        for name, sft in {
            "padded": {},
            "packing_bfd": {"packing": True},
            "padding_free": {"padding_free": True, "max_length": None},
        }.items()
    }
    print(f"useful token share per batch: {ratios}", file=sys.stderr)
    best = {kind: max(v["tok_s"] for v in result.values[kind]) for kind in ("stage", "raw")}
    summary = {"bench": "student", **result.fields("ratio_vs_raw", "tok_s")}
    summary |= {
        "ratio_best_vs_best": round(best["stage"] / best["raw"], 3),
        "useful_token_ratio": round(min(ratios["packing_bfd"], ratios["padding_free"]), 3),
        "stage_tok_s": round(result.median("stage", "tok_s")),
        "raw_tok_s": round(result.median("raw", "tok_s")),
        "padded_token_ratio": round(ratios["padded"], 3),
        # whole call, start-up included: the stage also checks, measures rows and writes metrics/plot
        "stage_wall_s": round(min(v["wall_s"] for v in result.values["stage"]), 1),
        "raw_wall_s": round(min(v["wall_s"] for v in result.values["raw"]), 1),
        "target": {"ratio_vs_raw": ">= 0.95", "useful_token_ratio": ">= 0.9"},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
