"""`distill generate`: the recipe's problems → R1-style traces, durable as they finish, resumable, shardable.

    distill generate recipes/deepseek-v4-api.yaml             # one job
    distill generate recipes/r1-vllm-2node.yaml --shard 3/8    # job 3 of 8 (e.g. a Slurm array task)

Output: `shard-<i>-of-<N>.jsonl` files (one `distill.records.Trace` per line) in `runs/<name>/generate/`; later
stages read every `*.jsonl` there. See `teacher.shards` for the crash-safety and sharding guarantees and
`generate_traces` for the plain call evaluation reuses.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from distill import lengths
from distill.data import Loaded, content_hash, load_problems
from distill.errors import DistillError
from distill.mixture import interleave
from distill.pipeline import StageContext, StageReport
from distill.prompts import Prompts, check_template, resolve_template, source_prompts
from distill.records import Problem, Trace
from distill.schema import Recipe, Teacher
from teacher import engine
from teacher.generation_progress import ProgressBar
from teacher.shards import ShardStore, shard_of
from teacher.traces import GenerationStats, OnDone

log = logging.getLogger(__name__)


def load(recipe: Recipe) -> list[Loaded]:
    """The problems the recipe selects. The runner loads them once, hashes them (`problems_hash`) to decide whether
    the stage must run, and hands them to `run` in `ctx.problems`."""
    return load_problems(recipe.data, recipe.mixture)


problems_hash = content_hash


def stream_traces(
    problems: Sequence[Problem],
    *,
    teacher: Teacher,
    stats: GenerationStats,
    on_done: OnDone,
    llm: Any = None,
    prompts: Prompts | None = None,
) -> None:
    """Generate `teacher.sampling["n"]` traces per problem with `teacher.backend`, handing finished problems to
    `on_done` in completion order (not input order), each as its n traces sorted by sample index. Problems whose
    prompt is too long are skipped and counted in `stats.skipped` / `stats.skipped_ids`. `llm`: a loaded
    `vllm.LLM` to reuse (vllm backend only). `prompts`: per-source templates (`distill.prompts.source_prompts`).
    With `teacher.thinking_budget`, each sample's thinking is capped (`teacher.budget`)."""
    if teacher.prompt is not None:
        check_template(teacher.prompt)
    if teacher.backend == "vllm" and teacher.thinking_budget is not None:
        from teacher.budget import generate_budgeted

        generate_budgeted(problems, teacher=teacher, stats=stats, on_done=on_done, llm=llm, prompts=prompts)
    elif teacher.backend == "vllm":
        from teacher.offline import generate_offline

        generate_offline(problems, teacher=teacher, stats=stats, on_done=on_done, llm=llm, prompts=prompts)
    else:
        from teacher.endpoint import generate_endpoint

        generate_endpoint(problems, teacher=teacher, stats=stats, on_done=on_done, prompts=prompts)


def generate_traces(
    problems: Sequence[Problem],
    *,
    teacher: Teacher,
    stats: GenerationStats | None = None,
    llm: Any = None,
    prompts: Prompts | None = None,
) -> list[Trace]:
    """Traces for `problems`, `teacher.sampling["n"]` per problem, in input order: problem by problem as given,
    then by sample index (`(id, sample)` follows `problems`). Skipped problems (prompt too long) have no traces;
    pass `stats` to see them (`stats.skipped_ids`) and the token totals. Nothing is written to disk.

        teacher = Teacher(model=model_dir, sampling=recipe.eval.sampling, engine=recipe.eval.engine)
        traces = generate_traces(problems, teacher=teacher)  # each kind's default prompt, <think> prefix
    """
    stats = stats or GenerationStats()
    finished: dict[int, list[Trace]] = {}
    by_id: dict[str, list[int]] = {}
    for index, problem in enumerate(problems):
        by_id.setdefault(problem.id, []).append(index)

    def collect(batch: list[list[Trace]]) -> None:
        for traces in batch:
            index = by_id[traces[0].id].pop(0)  # repeated problems: first finished fills the first slot
            finished[index] = traces

    stream_traces(problems, teacher=teacher, stats=stats, on_done=collect, llm=llm, prompts=prompts)
    return [trace for index in sorted(finished) for trace in finished[index]]


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    """The stage: this job's shard of the problems, resumed from what is already on disk."""
    teacher = _teacher(recipe)
    prompts = source_prompts(recipe.data, teacher=teacher)
    lengths.check_teacher(recipe)
    loaded = ctx.problems if ctx.problems is not None else load(recipe)
    problems = interleave([source.problems for source in loaded])  # a run stopped early still holds the mix
    dropped: Counter[str] = Counter()
    for source in loaded:
        dropped.update(source.dropped)
    index, count = ctx.options.shard
    samples = int(teacher.sampling.get("n", 1))
    store = ShardStore(ctx.work_dir, shard=(index, count), samples=samples)
    mine = [p for p in problems if shard_of(p.id, count) == index]
    done = store.resume()
    todo = [p for p in mine if p.id not in done]
    _log_scale(teacher, total=len(problems), dropped=dropped, mine=len(mine), todo=len(todo), shard=(index, count))
    for source in loaded:
        weight = "" if source.source.weight is None else f", weight {source.source.weight:g}"
        log.info(
            "generate: source %s (%s%s): %d problems; dropped on load: %s",
            source.spec.name,
            source.spec.kind,
            weight,
            len(source.problems),
            dict(source.dropped) or "none",
        )
    endpoint = teacher.endpoint
    stats = GenerationStats(
        price_input_per_m=endpoint.price_input_per_m if endpoint else 0.0,
        price_output_per_m=endpoint.price_output_per_m if endpoint else 0.0,
    )
    previous, started = store.previous_state(), time.monotonic()
    bar = ProgressBar(
        total=len(todo), stats=stats, show_cost=teacher.backend == "openai", enabled=ctx.options.progress
    )
    # Held until the totals are taken, so `generation_s` ends at the last durable write, not after the engine's
    # release; nothing left to generate loads no engine.
    with engine(teacher) if todo else contextlib.nullcontext() as llm:
        with bar.shown(), store.writer(snapshot=lambda: _state(previous, stats, started)) as writer:

            def on_done(batch: list[list[Trace]]) -> None:
                writer.add(batch)
                bar.update()

            stream_traces(todo, teacher=teacher, stats=stats, on_done=on_done, llm=llm, prompts=prompts)
        state = _state(previous, stats, started)
    if not store.mark_done(state):
        counts = {"in": len(mine), "out": len(mine) - sum(stats.skipped.values()), "dropped": dict(stats.skipped)}
        return StageReport(counts=counts, extra=state, complete=False)
    return _report(
        store,
        teacher=teacher,
        loaded_in=len(problems) + sum(dropped.values()),
        dropped=dropped,
        stats=stats,
        state=state,
        sources=[
            {
                **source.summary(),
                "prompt": resolve_template(source.source.prompt, teacher=teacher, kind=source.spec.kind),
            }
            for source in loaded
        ],
    )


def _teacher(recipe: Recipe) -> Teacher:
    if recipe.teacher is None:
        raise DistillError("stage generate needs a `teacher` section in the recipe")
    return recipe.teacher


def _log_scale(
    teacher: Teacher, *, total: int, dropped: Counter[str], mine: int, todo: int, shard: tuple[int, int]
) -> None:
    n, max_tokens = teacher.sampling.get("n", 1), teacher.sampling.get("max_tokens")
    log.info(
        "generate: %d problems (%d dropped on load: %s) × n=%d = %d generations, max %s tokens each, teacher "
        "%s via %s",
        total,
        sum(dropped.values()),
        dict(dropped) or "none",
        n,
        total * n,
        max_tokens,
        teacher.model,
        teacher.backend,
    )
    log.info("generate: shard %d/%d holds %d problems, %d already written, %d to go", *shard, mine, mine - todo, todo)


def _state(previous: dict[str, Any], stats: GenerationStats, started: float) -> dict[str, Any]:
    """This shard's totals: wall time and retries accumulate over reruns; skips are recounted by each run."""
    retries = Counter(previous.get("retries", {}))
    retries.update(stats.retries)
    return {
        "wall_s": round(previous.get("wall_s", 0.0) + time.monotonic() - started, 3),
        "retries": dict(retries),
        "skipped": dict(stats.skipped),
        "generation_s": round(stats.elapsed_s, 3),  # this run only: from the first request to now
        "generation_cpu_s": round(stats.cpu_s, 3),  # this run only
        "generated_tokens": stats.completion_tokens,  # this run only
    }


def _report(
    store: ShardStore,
    *,
    teacher: Teacher,
    loaded_in: int,
    dropped: Counter[str],
    stats: GenerationStats,
    state: dict[str, Any],
    sources: list[dict[str, Any]],
) -> StageReport:
    """Totals over every shard: counts are problems (`in` = `out` + dropped); `traces` counts rows."""
    totals = store.totals()
    retries: Counter[str] = Counter()
    states = store.all_states()
    for state in states:
        dropped.update(state.get("skipped", {}))
        retries.update(state.get("retries", {}))
    cost = (
        totals.get("prompt_tokens", 0) * stats.price_input_per_m
        + totals.get("completion_tokens", 0) * stats.price_output_per_m
    ) / 1e6
    extra = {
        "sources": sources,
        "teacher": teacher.model,
        "backend": teacher.backend,
        "samples_per_problem": int(teacher.sampling.get("n", 1)),
        "shards": store.count,
        "prompt_tokens": totals.get("prompt_tokens", 0),
        "completion_tokens": totals.get("completion_tokens", 0),
        "finish_reasons": totals["finish_reasons"],
        "timed_out": totals["finish_reasons"].get("timeout", 0),  # endpoint samples silent through every retry
        "reported_models": totals["reported_models"],  # traces per model the endpoint said it ran
        "system_fingerprints": totals["system_fingerprints"],
        "cost_usd": round(cost, 6),
        "retries": dict(retries),
        "retries_total": sum(retries.values()),
        "wall_s": round(sum(s.get("wall_s", 0.0) for s in states), 3),
        **{key: state[key] for key in ("generation_s", "generation_cpu_s", "generated_tokens")},
        "tokens_per_s": round(state["generated_tokens"] / max(state["generation_s"], 1e-9), 1),
    }
    log.info(
        "generate: %d problems, %d traces, %s prompt + %s completion tokens, $%.2f, %d retries, %d timed out",
        totals["problems"],
        totals.get("traces", 0),
        f"{extra['prompt_tokens']:,}",
        f"{extra['completion_tokens']:,}",
        cost,
        extra["retries_total"],
        extra["timed_out"],
    )
    counts = {"in": loaded_in, "out": totals["problems"], "dropped": dict(dropped), "traces": totals.get("traces", 0)}
    return StageReport(counts=counts, extra=extra)
