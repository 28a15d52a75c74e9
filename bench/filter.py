"""Filter benchmark: verification throughput against the ideal, and peak memory as the input grows.

    .venv/bin/python bench/filter.py [--rounds 5] [--quick]     # prints progress, then a final JSON line

1. Plain rate: one process, the obvious loop `verify(parse(gold), parse(pred))` (math-verify defaults) over the
   base traces: the complete real traces in ../shared/data/reasoning_traces (prediction = text after `</think>`)
   and the 268 Math-Verify cases. Ideal = cores × plain rate.
2. Stage rate: the filter stage (all default per-trace steps, `workers = cores`) on the same base traces repeated
   to `--stage-records`, each copy its own problem (so dedup is switched off: the copies are duplicates by design).
   Records/s over the whole first pass, pool start-up included. Stage and plain (1., and `workers` plain processes
   in parallel on the stage's records: the ideal measured, not multiplied) run in interleaved rounds after a
   warm-up (bench/harness.py: ABBA order); ratios are medians of per-round ratios, with their spread.
3. Peak RSS of the whole process tree (stage process + workers), sampled every 0.2 s, when filtering 10k and 200k
   records synthesised from the real traces (their gold and last `\\boxed{}` as the final, 2,000 characters of real
   reasoning; 8 samples per problem), cheap enough to verify that 200k records take minutes, not hours.
Targets: ratio_vs_ideal >= 0.9; rss_mb_200k / rss_mb_10k < 1.5. `--quick`: 400 stage records, one round, RSS at
2k and 20k records (still reported as rss_mb_10k / rss_mb_200k; `rss_records` says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"  # the default `--data`: the real traces beside a checkout (CI has them)
_spec = importlib.util.spec_from_file_location("bench_harness", Path(__file__).with_name("harness.py"))
harness = sys.modules.setdefault("bench_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)


def base_pairs() -> list[tuple[str, str]]:
    """(gold answer, final text) pairs: complete real traces, then the Math-Verify cases."""
    from distill.records import split_reasoning

    pairs = []
    for name in ("skyt1_32b_aime24.jsonl", "skyt1_32b_reflection_amc23.jsonl"):
        for line in (SHARED / "reasoning_traces" / name).read_text().splitlines():
            row = json.loads(line)
            if row["has_think_close"]:
                pairs.append(
                    (
                        row.get("reference_answer_normalized") or str(row["reference_answer"]),
                        split_reasoning(row["response"])[1],
                    )
                )
    for line in (SHARED / "verifier_cases" / "math_verify_cases.jsonl").read_text().splitlines():
        row = json.loads(line)
        pairs.append((row["gold"], row["pred"]))
    return pairs


def plain_rate(pairs: list[tuple[str, str]], *, rounds: int) -> tuple[float, float]:
    """(records per wall second, records per CPU second) of the plain single-process loop."""
    from math_verify import parse, verify

    from distill.filter.answers import gold_text

    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for gold, final in pairs:
            verify(parse(gold_text(gold)), parse(final))
    n = rounds * len(pairs)
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def _plain_share(share: list[tuple[str, str]]) -> tuple[float, float]:
    """One process of the parallel plain baseline: warm up, then time its share (monotonic clock, shared by all)."""
    import logging

    from distill.filter.answers import warm_up

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # warm_up runs without math-verify's own timeout
    warm_up()
    start = time.perf_counter()
    plain_rate(share, rounds=1)
    return start, time.perf_counter()


def parallel_plain_rate(pairs: list[tuple[str, str]], *, records: int, workers: int) -> float:
    """The embarrassingly parallel ideal measured, not multiplied: `workers` independent plain processes on
    disjoint shares of the stage's records, under whatever else the machine is running at the time."""
    import multiprocessing

    rows = [pairs[i % len(pairs)] for i in range(records)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        spans = pool.map(_plain_share, [rows[i::workers] for i in range(workers)])
    return records / (max(end for _, end in spans) - min(start for start, _ in spans))


def trace_row(index: int, gold: str, final: str, *, per_problem: int, reasoning: str = "We compute it.") -> dict:
    problem = f"Problem {index // per_problem}: compute the value asked for."
    return {
        "id": f"p{index // per_problem:09d}",
        "source": "bench",
        "kind": "math",
        "problem": problem,
        "answer": gold,
        "sample": index % per_problem,
        "prompt": [{"role": "user", "content": problem}],
        "completion": f"<think>\n{reasoning}\n</think>\n\n{final}",
        "reasoning": reasoning,
        "final": final,
        "finish_reason": "stop",
        "prompt_tokens": 10,
        "completion_tokens": 100,
        "teacher": "bench",
        "sampling": {},
        "meta": {},
    }


def run_stage(rows_path: Path, work: Path, *, workers: int) -> dict:
    from distill.filter.stage import run
    from distill.pipeline import StageContext, StageOptions
    from distill.schema import Recipe

    recipe = Recipe.model_validate(
        {
            "name": "bench",
            "data": [{"spec": "local_jsonl", "path": "x"}],
            "filter": {"workers": workers, "dedup": False, "near_dup_threshold": None, "no_answer": False},
        }
    )
    work.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    report = run(recipe, ctx=StageContext(work, work, {"generate": rows_path.parent}, StageOptions(progress=False)))
    cpu_s = time.process_time() - cpu + report.extra["worker_cpu_s"]
    return {**report.counts, **report.extra, "wall_s": time.perf_counter() - start, "cpu_s": cpu_s}


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and all its descendants (forkserver workers included), from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)], rss[int(entry.name)] = (
                    int(stat[1]),
                    int(stat[21]) * os.sysconf("SC_PAGE_SIZE"),
                )
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        node = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == node and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree) / 2**20


def rss_child(records: int, folder: Path, workers: int) -> None:
    """Write `records` synthetic traces, filter them, print {"records", "peak_rss_mb", ...} as JSON."""
    from distill.data import last_boxed
    from distill.records import split_reasoning

    # the real traces' (gold, last boxed answer) pairs: cheap to verify, so 200k records fit in minutes
    short = [(gold, f"\\boxed{{{last_boxed(final)}}}") for gold, final in base_pairs()[:54] if last_boxed(final)]
    thoughts = []  # real reasoning, cut to 2,000 characters so 200k records verify in minutes
    for line in (SHARED / "reasoning_traces" / "skyt1_32b_reflection_amc23.jsonl").read_text().splitlines():
        thoughts.append(split_reasoning(json.loads(line)["response"])[0][:2000] or "We compute it.")
    (folder / "gen").mkdir(parents=True, exist_ok=True)
    with (folder / "gen" / "traces.jsonl").open("w") as handle:
        for index in range(records):
            gold, final = short[index % len(short)]
            row = trace_row(index, gold, final, per_problem=8, reasoning=thoughts[index % len(thoughts)])
            handle.write(json.dumps(row) + "\n")
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_rss_mb(os.getpid()))

    threading.Thread(target=sample, daemon=True).start()
    result = run_stage(folder / "gen" / "traces.jsonl", folder / "work", workers=workers)
    done.set()
    print(
        json.dumps(
            {
                "records": records,
                "peak_rss_mb": round(peak[0], 1),
                "in": result["in"],
                "out": result["out"],
                "records_per_s": result["verify_records_per_s"],
            }
        )
    )


def measure_rss(records: int, folder: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(records), "--dir", str(folder), "--workers", str(workers)]
    cmd += ["--data", str(SHARED)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_side(pairs: list[tuple[str, str]], args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    """The filter stage on `--stage-records` copies of the base traces, a fresh work folder per call."""
    gen = args.dir / "stage" / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    with (gen / "traces.jsonl").open("w") as handle:
        for index in range(args.stage_records):
            gold, final = pairs[index % len(pairs)]
            handle.write(json.dumps(trace_row(index, gold, final, per_problem=1)) + "\n")
    calls = [0]

    def call() -> dict[str, float]:
        calls[0] += 1
        stage = run_stage(gen / "traces.jsonl", args.dir / "stage" / f"work{calls[0]}", workers=args.workers)
        rate = stage["verify_records_per_s"]
        return {"ideal": rate, "cpu": stage["in"] / stage["cpu_s"], "parallel": rate}

    return call


def plain_side(pairs: list[tuple[str, str]], args: argparse.Namespace) -> Callable[[], dict[str, float]]:
    """The ideal: `workers` × the plain loop's rate; its rate per CPU-second; `workers` plain processes measured."""
    # as many passes over the base set as each stage worker makes, so math-verify's parse caches warm up alike
    passes = max(1, round(args.stage_records / len(pairs) / args.workers))

    def call() -> dict[str, float]:
        plain, plain_cpu = plain_rate(pairs, rounds=passes)
        parallel = parallel_plain_rate(pairs, records=args.stage_records, workers=args.workers)
        return {"ideal": plain * args.workers, "cpu": plain_cpu, "parallel": parallel}

    return call


def main() -> None:
    global SHARED  # the trace readers above read it; `--data` sets it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage-records", type=int, default=1000)
    parser.add_argument("--rss-records", type=int, nargs=2, default=[10_000, 200_000])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder with reasoning_traces/, verifier_cases/")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    harness.add_arguments(parser)
    args = parser.parse_args()
    SHARED = args.data
    if args.rss_child is not None:
        rss_child(args.rss_child, args.dir, args.workers)
        return
    if not (SHARED / "reasoning_traces").is_dir():
        print(json.dumps({"bench": "filter", "skipped": f"real traces not found at {SHARED} (pass --data DIR)"}))
        return
    if args.quick:
        args.stage_records, args.rss_records = min(args.stage_records, 400), [2_000, 20_000]
    args.dir = args.dir or Path(tempfile.mkdtemp(prefix="distill-bench-filter-"))
    pairs = base_pairs()
    result = harness.compare(
        stage_side(pairs, args),
        plain_side(pairs, args),
        rounds=harness.rounds_of(args),
        names=("stage", "plain"),
        quick=args.quick,
    )
    small, large = (measure_rss(n, args.dir / f"rss{n}", args.workers) for n in args.rss_records)
    print(f"peak RSS {small} / {large}", file=sys.stderr, flush=True)
    summary = {"bench": "filter", **result.fields("ratio_vs_ideal", "ideal")}
    summary |= {
        "rss_mb_10k": small["peak_rss_mb"],
        "rss_mb_200k": large["peak_rss_mb"],
        "rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "rss_records": args.rss_records,
        "cpu_efficiency": round(result.ratio("cpu"), 3),
        "ratio_vs_parallel_plain": round(result.ratio("parallel"), 3),
        "spread_vs_parallel_plain": result.spread("parallel"),
        "workers": args.workers,
        "plain_records_per_s": round(result.median("plain", "ideal") / args.workers, 1),
        "stage_records_per_s": round(result.median("stage", "ideal"), 1),
        "load_avg_1m": os.getloadavg()[0],
        "target": {"ratio_vs_ideal": ">= 0.9", "rss_growth": "< 1.5"},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
