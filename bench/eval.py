"""Eval stage throughput versus a raw vLLM + math-verify script: same model, problems, prompts, sampling, engine.

    .venv/bin/python bench/eval.py [--problems 256] [--n 4] [--max-tokens 160] [--rounds 5] [--quick]

Stage: `distill eval` in-process (`pipeline.run_stage(recipe, "eval")`, `eval.model` set: one model, scored by
`distill.scoring.score_model`): prompt checks, generation through the teacher's offline backend, verification in
the filter's worker pool, pass@k, output files, manifest. Raw: `vllm.LLM(...).generate(prompts,
SamplingParams(n=k, ...))` on the same prompts (`distill.prompts.generation_prompt`; checked equal), then
`math_verify.parse` + `verify` of each sample's last `\\boxed{}` against the gold, in one process. Rate: samples/s
over generation + verification; engine load, engine release and imports (fixed start-up and tear-down, not
throughput) are excluded from both: each clock starts when `vllm.LLM(...)` has returned, and the stage's
`engine_core.shutdown()` (~1.3 s of vLLM's own garbage collection, which the raw script leaves to process exit) is
timed apart (`stage_shutdown_s`) and taken out. The model: the demo's tiny teacher, SFT-trained only
`--teacher-steps`, enough that every sample ends in `</think>` and a `\\boxed{}` (mostly wrong sums) and is really
verified; the problems: its held-out additions; both cached in `--dir`. Each measurement runs in its own process (a
second vLLM engine in one process runs slower); rounds interleave the two sides after a warm-up (bench/harness.py:
ABBA order) and the ratio is the median of per-round ratios, with its spread. Target >= 0.9. Also samples per
CPU-second (stage: its process + verify workers), steadier on a shared machine. `--quick`: 32 problems, one round.
Last line: {"bench": "eval", "ratio_vs_raw": ..., "spread": [min, max], "rounds": ..., "load_avg": [start, end],
"stage_samples_per_s": ..., "raw_samples_per_s": ..., "samples": ..., "target": {...}}
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# This folder holds files named like the packages they measure: drop it from the path so `import teacher` works.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
_spec = importlib.util.spec_from_file_location("bench_harness", Path(__file__).with_name("harness.py"))
harness = sys.modules.setdefault("bench_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_HOST_IP": "127.0.0.1"}
for key, value in {**ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(key, value)

if TYPE_CHECKING:  # imports stay in the functions: the stage's verification workers import this file again
    from collections.abc import Callable

    from distill.schema import Recipe


def bench_recipe(folder: Path, args: argparse.Namespace) -> Recipe:
    """The demo's layout in `folder`; eval scores its teacher (`eval.model`) on the first `--problems` held out."""
    from distill.schema import Recipe
    from distill.tinymodel import CPU_ENGINE

    heldout = {"spec": "local_jsonl", "path": str(folder / "heldout.jsonl"), "limit": args.problems}
    sampling = {"n": args.n, "max_tokens": args.max_tokens}  # R1's temperature 0.6 and top_p 0.95 are merged in
    evaluate = {"model": str(folder / "teacher"), "benchmarks": [heldout], "sampling": sampling}
    evaluate["engine"] = {**CPU_ENGINE, "max_model_len": 512}
    models = {"teacher": {"model": str(folder / "teacher")}, "student": {"model": str(folder / "student")}}
    data = {"spec": "local_jsonl", "path": str(folder / "problems.jsonl")}
    return Recipe.model_validate({"name": "bench", "data": data, **models, "eval": evaluate})


def result(seconds: float, cpu: float, chats: list[Any], verdicts: list[bool], tokens: int, **parts: float) -> dict:
    """One measurement: wall and CPU seconds, samples, correct ones, tokens, the prompts' digest, parts' seconds."""
    prompts = hashlib.sha256(json.dumps(chats, sort_keys=True).encode()).hexdigest()[:16]
    counts = {"samples": len(verdicts), "correct": sum(verdicts), "tokens": tokens}
    return {"s": seconds, "cpu": cpu, **counts, "prompts": prompts, **parts}


def raw(recipe: Recipe) -> dict[str, Any]:
    """The script a user would write: one `LLM.generate`, then math-verify on every sample in this process."""
    from math_verify import parse, verify
    from vllm import LLM, SamplingParams

    from distill.data import last_boxed, load_source
    from distill.prompts import generation_prompt, messages
    from distill.schema import Teacher

    problems = load_source(recipe.eval.benchmarks[0]).problems
    teacher = Teacher(model=recipe.eval.model, sampling=recipe.eval.sampling, engine=recipe.eval.engine)
    llm = LLM(model=teacher.model, **teacher.engine)
    started, cpu = time.monotonic(), time.process_time()
    tokenizer = llm.get_tokenizer()
    chats = [messages(p, teacher=teacher) for p in problems]
    prompts = [generation_prompt(tokenizer, chat, think_prefix=teacher.think_prefix) for chat in chats]
    outputs = llm.generate(prompts, SamplingParams(**teacher.sampling), use_tqdm=False)
    generated = time.monotonic()
    verdicts = []
    for problem, output in zip(problems, outputs, strict=True):
        gold = parse(f"\\boxed{{{problem.answer}}}")
        for sample in output.outputs:
            boxed = last_boxed(sample.text.rpartition("</think>")[2])
            verdicts.append(bool(boxed and verify(gold, parse(f"\\boxed{{{boxed}}}"))))
    done = time.monotonic()
    tokens = sum(len(s.token_ids) for o in outputs for s in o.outputs)
    parts = {"generate_s": generated - started, "verify_s": done - generated}
    return result(done - started, time.process_time() - cpu, chats, verdicts, tokens, **parts)


def stage(recipe: Recipe, runs: Path) -> dict[str, Any]:
    """`distill eval` in this process, its clock started when its engine has loaded; wrappers time its parts."""
    import distill.filter.pool
    import distill.pass_at_k  # imports Hugging Face `evaluate` (~6 s); imports are outside both clocks
    import distill.scoring
    import teacher.generate
    import teacher.offline
    from distill import files, pipeline

    marks: dict[str, float] = {}
    cpu = {"workers": 0.0}  # CPU seconds of the verification workers, which the pool sums as they exit

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.monotonic()
            try:
                return fn(*a, **kw)
            finally:
                marks[name] = marks.get(name, 0.0) + time.monotonic() - t0

        return wrapper

    def load(*a: Any, **kw: Any) -> Any:
        llm = load_engine(*a, **kw)
        core = llm.llm_engine.engine_core  # serving() shuts it down on the way out; the raw script never does
        core.shutdown = timed("shutdown_s", core.shutdown)
        marks["loaded"], cpu["loaded"] = time.monotonic(), time.process_time()
        return llm

    def pool_exit(pool: Any, *exc: object) -> None:
        pool_exit_(pool, *exc)
        cpu["workers"] += pool.worker_cpu_s

    load_engine, teacher.offline.load_engine = teacher.offline.load_engine, load
    pool_exit_, distill.filter.pool.VerifyPool.__exit__ = distill.filter.pool.VerifyPool.__exit__, pool_exit
    teacher.generate.generate_traces = timed("generate_s", teacher.generate.generate_traces)
    distill.scoring.verify = timed("verify_s", distill.scoring.verify)
    pipeline.run_stage(recipe, "eval", runs_dir=runs, options=pipeline.StageOptions(progress=False))
    seconds = time.monotonic() - marks.pop("loaded") - marks.get("shutdown_s", 0.0)  # release is not throughput
    cpu_s = time.process_time() - cpu["loaded"] + cpu["workers"]
    rows = list(files.read_jsonl(runs / recipe.name / "eval" / "samples.jsonl"))
    chats = [row["prompt"] for row in rows if row["sample"] == 0]
    verdicts = [row["verdict"]["correct"] for row in rows]
    tokens = sum(row["completion_tokens"] for row in rows)
    other = seconds - sum(v for k, v in marks.items() if k != "shutdown_s")
    return result(seconds, cpu_s, chats, verdicts, tokens, **marks, other_s=other)


def child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--problems", str(args.problems), "--n", str(args.n), "--max-tokens", str(args.max_tokens)]
    command = [sys.executable, __file__, "--only", kind, "--dir", str(args.dir), *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/eval.py --only {kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side(kind: str, args: argparse.Namespace, seen: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """One side for the harness: a child measurement, checked to score the same samples and prompts as every other."""

    def call() -> dict[str, Any]:
        r = child(kind, args)
        for key in ("samples", "prompts"):
            if seen.setdefault(key, r[key]) != r[key]:
                sys.exit(f"bench/eval.py: {kind} differs in {key}: {r[key]} (others: {seen[key]})")
        seen.setdefault(f"{kind}_tokens", r["tokens"])
        parts = {k: v for k, v in r.items() if k.endswith("_s")}
        return {"rate": (r["samples"], r["s"]), "cpu": (r["samples"], r["cpu"]), **parts}

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=256, help="held-out problems scored (at most 512)")
    parser.add_argument("--n", type=int, default=4, help="samples per problem (eval.sampling.n)")
    parser.add_argument("--max-tokens", type=int, default=160)
    harness.add_arguments(parser)
    parser.add_argument("--teacher-steps", type=int, default=200, help="SFT steps of the demo teacher scored")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "distill-bench-eval")
    parser.add_argument("--only", choices=["raw", "stage"], help=argparse.SUPPRESS)  # child: one measurement
    args = parser.parse_args()
    if args.quick:
        args.problems = min(args.problems, 32)
    recipe = bench_recipe(args.dir, args)
    if args.only:
        with tempfile.TemporaryDirectory() as runs:
            print(json.dumps(raw(recipe) if args.only == "raw" else stage(recipe, Path(runs))))
        return
    t0 = time.monotonic()
    from distill.demo.prepare import Settings, prepare

    with contextlib.redirect_stdout(sys.stderr):  # the teacher's training logs; cached by its settings after that
        settings = Settings(problems=8, heldout=512, teacher_problems=1600, teacher_steps=args.teacher_steps)
        prepare(recipe, settings=settings, progress=False)
    seen: dict[str, Any] = {}
    rounds = harness.rounds_of(args)
    result = harness.compare(side("stage", args, seen), side("raw", args, seen), rounds=rounds, quick=args.quick)
    ratio = result.ratio()
    print(f"ratio {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'missed'})", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"bench": "eval", **result.fields("ratio_vs_raw"), "target": {"ratio_vs_raw": ">= 0.9"}}
    summary |= {f"{kind}_samples_per_s": round(result.median(kind), 1) for kind in ("stage", "raw")}
    summary["ratio_vs_raw_cpu"] = round(result.ratio("cpu"), 3)  # samples per CPU-s: steadier
    summary |= {"samples": seen["samples"]}
    summary["timed"] = "generation + verification (+ the stage's own work); engine load, release, imports excluded"
    for kind, runs in result.values.items():  # each side's parts (medians, seconds) and generated tokens
        summary |= {f"{kind}_{k}": round(result.median(kind, k), 2) for k in runs[0] if k.endswith("_s")}
        summary[f"{kind}_tokens"] = seen[f"{kind}_tokens"]
    summary |= {"wall_s": round(time.monotonic() - t0, 1), "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
