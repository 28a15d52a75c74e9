"""Stage `eval`: score a model on the recipe's benchmarks with R1's protocol.

For each benchmark, k samples per problem (`eval.sampling.n`, temperature 0.6, top_p 0.95 by default) are drawn
through the teacher's own generation entry point (the same prompt and `<think>` forcing the student was trained
with), verified with the filter's verifiers (same reasons, same timeouts), and scored with `distill/pass_at_k.py`
(also an `evaluate` module): pass@1 as the mean over the k samples, the unbiased pass@k, and maj@k. A sample cut by
`max_tokens` (or without `</think>`) is wrong, not an error; a problem whose prompt does not fit the model is
counted wrong and reported. Outputs: `samples.jsonl` (prompt, completion, extracted answer, verdict per sample),
`results.json`, `results.md`; with `eval.compare_base`, the base model is scored on the same problems.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from distill import files
from distill.data import Loaded, last_boxed, load_source
from distill.pass_at_k import score
from distill.pipeline import StageContext, StageReport
from distill.prompts import source_prompts
from distill.records import CUT_SHORT, Problem, Trace
from distill.schema import Recipe, Teacher

log = logging.getLogger(__name__)


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    cfg = recipe.eval
    models = {"student": ctx.options.model or cfg.model or str(ctx.inputs["train"])}
    if cfg.compare_base:
        if recipe.student is None:
            raise ValueError("eval.compare_base: needs student.model (the base) in the recipe")
        models["base"] = recipe.student.model
    models = {label: servable(model, scratch=ctx.run_dir / ".work") for label, model in models.items()}
    benchmarks = [load_source(source) for source in cfg.benchmarks]
    if not benchmarks:
        raise ValueError("eval.benchmarks: name at least one benchmark dataset spec, e.g. [math500]")
    log.info(
        "eval: %s on %s, k=%d, max_tokens=%s",
        ", ".join(models.values()),
        ", ".join(f"{b.spec.name} ({len(b.problems)})" for b in benchmarks),
        cfg.sampling["n"],
        cfg.sampling.get("max_tokens"),
    )
    results: dict[str, Any] = {"k": cfg.sampling["n"], "sampling": cfg.sampling}
    samples = 0
    with files.atomic_open(ctx.work_dir / "samples.jsonl") as handle:
        for label, model in models.items():
            scores, written = score_model(
                recipe, model, benchmarks, handle=handle, label=label, progress=ctx.options.progress
            )
            results[label] = {"model": model, **scores}
            samples += written
    results["benchmarks"] = results["student"]["benchmarks"]  # what cards and tables read
    files.write_json(ctx.work_dir / "results.json", results)
    files.write_text(ctx.work_dir / "results.md", results_table(results))
    problems = sum(len(b.problems) for b in benchmarks)
    dropped = {reason: n for b in benchmarks for reason, n in b.dropped.items()}
    return StageReport(
        counts={"in": problems, "out": samples, "dropped": dropped},
        extra={label: results[label]["overall"] for label in models},
    )


def servable(model: str, *, scratch: Path) -> str:
    """A LoRA adapter folder (a LoRA run without `student.merge`) cannot be served as is: merge it into its base
    once, into a scratch folder named by the adapter's content hash (outside the stage output), and score that."""
    folder = Path(model)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return model
    from student.merge import merge_adapter

    scratch = scratch / f"merged-{files.sha256_tree(folder)[:12]}"
    if (scratch / "config.json").is_file():
        return str(scratch)
    if scratch.exists():
        shutil.rmtree(scratch)
    log.info("eval: %s is a LoRA adapter; merging it into its base in %s to serve it", model, scratch)
    return str(merge_adapter(folder, out=scratch))


def score_model(
    recipe: Recipe, model: str, benchmarks: list[Loaded], *, handle: Any, label: str, progress: bool
) -> tuple[dict[str, Any], int]:
    """Generate, verify and score one model on every benchmark, writing per-sample rows to `handle`."""
    from teacher.generate import generate_traces
    from teacher.traces import GenerationStats

    teacher = as_teacher(recipe, model)
    prompts = source_prompts(recipe.eval.benchmarks, teacher=teacher, where="eval.benchmarks")
    llm = None
    if teacher.backend == "vllm":
        from teacher.offline import load_engine

        llm = load_engine(teacher)
    per_benchmark, written = {}, 0
    by_kind: dict[str, tuple[list[list[str]], list[list[bool]]]] = {}
    for loaded in benchmarks:
        stats = GenerationStats()
        traces = generate_traces(loaded.problems, teacher=teacher, stats=stats, llm=llm, prompts=prompts)
        answers, verdicts, rows = judge(loaded.problems, traces, n=teacher.sampling["n"], recipe=recipe)
        for row in rows:
            handle.write(files.json_line({"model": label, "benchmark": loaded.spec.name, **row}))
        written += len(rows)
        scores = score(answers, verdicts, k=recipe.eval.pass_k)
        scores["prompt_too_long"] = len(stats.skipped_ids)
        per_benchmark[loaded.spec.name] = {"kind": loaded.spec.kind, **scores}
        kind_answers, kind_verdicts = by_kind.setdefault(loaded.spec.kind, ([], []))
        kind_answers += answers
        kind_verdicts += verdicts
        log.info("%s on %s: %s", label, loaded.spec.name, _brief(scores))
    del llm
    gc.collect()
    domains = {kind: score(a, v, k=recipe.eval.pass_k) for kind, (a, v) in by_kind.items()}
    all_answers = [keys for answers, _ in by_kind.values() for keys in answers]
    all_verdicts = [oks for _, verdicts in by_kind.values() for oks in verdicts]
    overall = score(all_answers, all_verdicts, k=recipe.eval.pass_k)
    return {"benchmarks": per_benchmark, "domains": domains, "overall": overall}, written


def as_teacher(recipe: Recipe, model: str) -> Teacher:
    """The model to score, set up as a teacher: the prompt and `<think>` prefix the student was trained with (a
    benchmark's own `prompt` wins; unset, each answer kind's default, as in generation)."""
    cfg = recipe.eval
    trained_with = recipe.teacher
    return Teacher(
        backend="openai" if cfg.endpoint else "vllm",
        model=model,
        prompt=trained_with.prompt if trained_with else None,
        system_prompt=trained_with.system_prompt if trained_with else None,
        think_prefix=trained_with.think_prefix if trained_with else "<think>\n",
        sampling=cfg.sampling,
        engine=cfg.engine,
        endpoint=cfg.endpoint,
    )


def judge(
    problems: list[Problem], traces: list[Trace], *, n: int, recipe: Recipe
) -> tuple[list[list[str]], list[list[bool]], list[dict[str, Any]]]:
    """Per problem: the k answer keys (for maj@k), the k verdicts, and the per-sample detail rows."""
    reasons = verify(traces, timeout_s=recipe.filter.verify_timeout_s, workers=recipe.filter.workers)
    by_problem: dict[str, list[tuple[Trace, str]]] = {}
    for trace, reason in zip(traces, reasons, strict=True):
        by_problem.setdefault(trace.id, []).append((trace, reason))
    answers, verdicts, rows = [], [], []
    for problem in problems:
        judged = by_problem.get(problem.id, [])
        keys = [answer_key(trace) for trace, _ in judged] + [""] * (n - len(judged))
        oks = [reason == "ok" for _, reason in judged] + [False] * (n - len(judged))
        answers.append(keys)
        verdicts.append(oks)
        for (trace, reason), key in zip(judged, keys, strict=False):
            rows.append(
                {
                    "id": trace.id,
                    "sample": trace.sample,
                    "prompt": trace.prompt,
                    "completion": trace.completion,
                    "extracted": key,
                    "finish_reason": trace.finish_reason,
                    "completion_tokens": trace.completion_tokens,
                    "verdict": {"correct": reason == "ok", "reason": reason},
                }
            )
    return answers, verdicts, rows


def verify(traces: list[Trace], *, timeout_s: float, workers: int | None) -> list[str]:
    """One reason per trace, in order, from the filter's own steps and worker pool: `truncated` (cut by max_tokens
    or no `</think>`), the answer check's reasons, `ok`. Same words and timeouts as the filter stage."""
    from distill.filter import to_item
    from distill.filter.pool import VerifyPool
    from distill.filter.steps import AnswerMatches, Truncated

    groups: list[list[dict[str, Any]]] = []
    for index, trace in enumerate(traces):
        if index == 0 or trace.id != traces[index - 1].id:
            groups.append([])
        groups[-1].append(to_item(trace.to_dict()))
    steps = [Truncated(), AnswerMatches(verify=True, timeout_s=timeout_s)]
    with VerifyPool(steps=steps, workers=workers or os.cpu_count() or 1, timeout_s=timeout_s) as pool:
        return [reason for outcomes in pool.imap(groups) for _, reason in outcomes]


def answer_key(trace: Trace) -> str:
    """What a sample answered, normalised for majority voting: the last \\boxed{} after `</think>`, the letter
    (choice), or the final code block with whitespace removed (code)."""
    from distill.filter.answers import choice_letter, final_code

    if trace.finish_reason in CUT_SHORT or "</think>" not in trace.completion:
        return ""
    if trace.kind == "choice":
        return choice_letter(trace.final, n_choices=len(trace.choices or []) or 26) or ""
    if trace.kind == "code":
        return "".join((final_code(trace.final) or "").split())
    boxed = last_boxed(trace.final) or ""
    return "".join(boxed.replace("\\left", "").replace("\\right", "").replace("\\!", "").split())


def _brief(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items() if "@" in k)


def results_table(results: dict[str, Any]) -> str:
    """Markdown: one row per model and benchmark, then one per domain (answer kind) when there are several, then
    the overall row."""
    labels = [label for label in ("student", "base") if label in results]
    keys = sorted({k for label in labels for k in results[label]["overall"] if "@" in k})
    lines = [
        f"k = {results['k']} samples per problem; scores in %.",
        "",
        "| model | benchmark | domain | problems | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for label in labels:
        scored = results[label]
        rows = [(name, scores["kind"], scores) for name, scores in scored["benchmarks"].items()]
        if len(scored.get("domains", {})) > 1:
            rows += [(f"all {kind}", kind, scores) for kind, scores in scored["domains"].items()]
        rows.append(("overall", "all", scored["overall"]))
        for name, kind, scores in rows:
            cells = " | ".join(f"{100 * scores[k]:.1f}" for k in keys)
            model = Path(scored["model"]).name
            lines.append(f"| {label} (`{model}`) | {name} | {kind} | {scores['problems']} | {cells} |")
    return "\n".join(lines) + "\n"
