"""Teacher stage throughput versus a bare `LLM.generate` call: same tiny model, same prompts, same SamplingParams.

    .venv/bin/python bench/teacher.py [--problems 128] [--n 4] [--max-tokens 256] [--rounds 5] [--quick]

The stage's rate is generated tokens over its generation time (first request to last durable write, so prompt
rendering, trace building, JSON and fsync are all inside); the raw rate is `LLM.generate` on the same rendered
prompts, tokenisation included. `ignore_eos` makes both do exactly the same work. Each measurement runs in its own
process (a second vLLM engine in one CPU process runs ~25% slower than the first, which would bias the order);
engine load is outside both clocks. Rounds interleave the two sides after a warm-up (bench/harness.py); the ratio
is the median of per-round ratios, with its spread. Final line:
{"bench": "teacher", "ratio_vs_raw": ..., "spread": [min, max], "rounds": ..., "load_avg": [start, end],
 "stage_tok_s": ..., "raw_tok_s": ..., "ratio_vs_raw_cpu": ..., "target": {...}}
(target ratio >= 0.95; the CPU-time ratio is the steadier one on a machine shared with other jobs). `--quick`:
16 problems x 64 tokens, one round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and `teacher` would name this file, not the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
_spec = importlib.util.spec_from_file_location("bench_harness", Path(__file__).with_name("harness.py"))
harness = sys.modules.setdefault("bench_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)
for key, value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(key, value)

from distill import pipeline  # noqa: E402  (the environment above must be set before vLLM is imported)
from distill.data import load_problems  # noqa: E402
from distill.prompts import messages  # noqa: E402
from distill.schema import Recipe  # noqa: E402
from distill.tinymodel import CPU_ENGINE, build_tiny_model  # noqa: E402

# the default `--data`: MATH-500 beside a checkout (CI has it)
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "math500" / "test.jsonl"
ENGINE = CPU_ENGINE


def raw_rate(recipe: Recipe) -> dict[str, float]:
    """Generated tokens per second (wall and CPU) of one `LLM.generate` call over the stage's rendered prompts."""
    from vllm import LLM, SamplingParams

    teacher = recipe.teacher
    problems = [p for source in load_problems(recipe.data) for p in source.problems]
    llm = LLM(model=teacher.model, **teacher.engine)
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(messages(p, teacher=teacher), tokenize=False, add_generation_prompt=True)
        + teacher.think_prefix
        for p in problems
    ]
    started, cpu_started = time.monotonic(), time.process_time()
    outputs = llm.generate(prompts, SamplingParams(**teacher.sampling), use_tqdm=False)
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
    tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    return {"wall": tokens / wall, "cpu": tokens / cpu}


def stage_rate(recipe: Recipe, runs: Path) -> dict[str, float]:
    """Generated tokens per second (wall and CPU) of the generate stage, as its manifest reports them."""
    manifest = pipeline.run_stage(recipe, "generate", runs_dir=runs, options=pipeline.StageOptions(progress=False))
    extra = manifest.extra
    return {
        "wall": extra["generated_tokens"] / extra["generation_s"],
        "cpu": extra["generated_tokens"] / extra["generation_cpu_s"],
    }


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One measurement in this process: `--only raw` or `--only stage` on the model in `--model`."""
    recipe = Recipe.model_validate(
        {
            "name": "bench",
            "data": {"spec": "math500", "path": str(args.data), "limit": args.problems},
            "teacher": {
                "model": str(args.model),
                "engine": ENGINE,
                "sampling": {"n": args.n, "max_tokens": args.max_tokens, "ignore_eos": True},
            },
        }
    )
    if args.only == "raw":
        return raw_rate(recipe)
    with tempfile.TemporaryDirectory() as runs:
        return stage_rate(recipe, Path(runs))


def child(kind: str, model: Path, args: argparse.Namespace) -> dict[str, float]:
    flags = [
        "--problems",
        str(args.problems),
        "--n",
        str(args.n),
        "--max-tokens",
        str(args.max_tokens),
        "--data",
        str(args.data),
    ]
    command = [sys.executable, __file__, "--only", kind, "--model", str(model), *flags]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])[kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    harness.add_arguments(parser)
    parser.add_argument("--only", choices=["raw", "stage"], help=argparse.SUPPRESS)  # child process: one measurement
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=DATA, help="MATH-500 test.jsonl (prompts only)")
    args = parser.parse_args()
    if not args.data.is_file():
        print(json.dumps({"bench": "teacher", "skipped": f"MATH-500 not found at {args.data} (pass --data FILE)"}))
        return
    if args.only:
        print(json.dumps({args.only: measure(args)}))
        return
    if args.quick:
        args.problems, args.max_tokens = min(args.problems, 16), min(args.max_tokens, 64)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        result = harness.compare(
            lambda: child("stage", model, args),
            lambda: child("raw", model, args),
            rounds=harness.rounds_of(args),
            quick=args.quick,
        )
    summary = {"bench": "teacher", **result.fields("ratio_vs_raw", "wall")}
    summary |= {f"{kind}_tok_s": round(result.median(kind, "wall"), 1) for kind in ("stage", "raw")}
    # Tokens per CPU-second: the same comparison, insensitive to other jobs on a shared machine.
    summary["ratio_vs_raw_cpu"] = round(result.ratio("cpu"), 3)
    summary["spread_cpu"] = result.spread("cpu")
    summary["target"] = {"ratio_vs_raw": ">= 0.95"}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
