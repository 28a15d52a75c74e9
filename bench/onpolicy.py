"""Benchmark the on-policy stage against a bare TRL script, on the same tiny student, teacher and prompts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onpolicy.py [--prompts 64] [--steps 60] [--rounds 5] [--quick]

Throughput: tokens/s through both models (TRL's `num_tokens`, prompt + sampled completion) over the training loop,
of `distill onpolicy` (the whole stage: tokenizer pairing, template and length checks, prompt rendering, trainer,
outputs) versus `DistillationTrainer(...).train()` written by hand with the same settings. The student is random
init, so its samples run to `max_completion_length` and both sides move the same number of tokens. Rounds interleave
the two sides after a warm-up (bench/harness.py: ABBA order); the ratio is the median of the per-round ratios, with
its spread, since the cores are shared. Target >= 0.95. `--quick`: 5 steps, one round.

Last line: {"bench": "onpolicy", "ratio_vs_raw": ..., "spread": [min, max], "rounds": ..., "load_avg": [start, end],
"stage_tok_s": [per round], "raw_tok_s": [per round], "target": {...}}
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

import yaml

# This folder holds files named like the packages they measure: drop it from the path so `import student` works.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
_spec = importlib.util.spec_from_file_location("bench_harness", Path(__file__).with_name("harness.py"))
harness = sys.modules.setdefault("bench_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)

from distill import files  # noqa: E402
from distill.manifest import Manifest, write_manifest  # noqa: E402
from distill.schema import R1_PROMPT  # noqa: E402
from distill.tinymodel import build_tiny_model  # noqa: E402

CONFIG = {
    "per_device_train_batch_size": 8,
    "max_completion_length": 64,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}
CPU = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False, "disable_tqdm": True}


def problems(n: int, path: Path) -> Path:
    rng = random.Random(0)
    rows = [(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(n)]
    files.write_jsonl(
        path, ({"id": f"p{i}", "problem": f"{a} + {b}", "answer": str(a + b)} for i, (a, b) in enumerate(rows))
    )
    return path


def stage(tmp: Path, models: dict[str, Path], data: Path, steps: int) -> float:
    """tokens/s of the stage's training loop (its metrics.json)."""
    from distill.pipeline import StageOptions, run_stage
    from distill.recipe import load_recipe

    runs = tmp / "runs"
    train = runs / "bench" / "train"
    if not train.exists():
        import shutil

        shutil.copytree(models["student"], train)
        counts = {"in": 1, "out": 1, "dropped": {}}
        fields = {"stage": "train", "recipe": "bench", "section_hash": "s", "input_hash": "i", "counts": counts}
        write_manifest(
            train, Manifest(**fields, output_hash=files.sha256_tree(train), started_at="", finished_at="", wall_s=0.0)
        )
    recipe = {
        "name": "bench",
        "data": {"spec": "local_jsonl", "path": str(data)},
        "teacher": {"model": str(models["teacher"])},
        "student": {"model": str(models["student"])},
        "onpolicy": {"config": {**CONFIG, "max_steps": steps}},
    }
    (tmp / "bench.yaml").write_text(yaml.safe_dump(recipe))
    run_stage(
        load_recipe(tmp / "bench.yaml"), "onpolicy", runs_dir=runs, options=StageOptions(progress=False), force=True
    )
    return json.loads((runs / "bench" / "onpolicy" / "metrics.json").read_text())["tokens_per_s"]


def raw(tmp: Path, models: dict[str, Path], data: Path, steps: int) -> float:
    """tokens/s of a hand-written DistillationTrainer script on the same prompts (rendered as the stage does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    tokenizer.padding_side = "left"
    prompts = []
    for row in files.read_jsonl(data):
        chat = [{"role": "user", "content": R1_PROMPT.format(problem=row["problem"])}]
        prompts.append(
            {"prompt": tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "<think>\n"}
        )
    trainer = DistillationTrainer(
        model=str(models["student"]),
        teacher_model=AutoModelForCausalLM.from_pretrained(models["teacher"]),
        args=DistillationConfig(**CONFIG, **CPU, max_steps=steps, output_dir=str(tmp / "raw")),
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
    )
    output = trainer.train()
    return trainer.state.num_input_tokens_seen / output.metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    harness.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 5)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = {
            "student": build_tiny_model(tmp / "student", seed=0),
            "teacher": build_tiny_model(tmp / "teacher", seed=1),
        }
        data = problems(args.prompts, tmp / "problems.jsonl")

        def side(measure: Callable[[Path, dict[str, Path], Path, int], float]) -> Callable[[], dict[str, float]]:
            def call() -> dict[str, float]:
                t0 = time.monotonic()
                rate = measure(tmp, models, data, args.steps)
                return {"tok_s": rate, "wall_s": time.monotonic() - t0}  # wall: the whole call, start-up included

            return call

        result = harness.compare(side(stage), side(raw), rounds=harness.rounds_of(args), quick=args.quick)
    summary = {"bench": "onpolicy", **result.fields("ratio_vs_raw", "tok_s")}
    summary |= {f"{kind}_tok_s": [round(v["tok_s"], 1) for v in result.values[kind]] for kind in ("stage", "raw")}
    summary["target"] = {"ratio_vs_raw": ">= 0.95"}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
