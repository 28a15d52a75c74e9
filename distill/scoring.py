"""Scoring one model for stage `eval`: k samples per problem on every benchmark, judged and scored, written to the
model's own folder, which the stage later merges with the other models' (`distill.evaluate`).

A model's folder holds `samples.jsonl` (one row per sample) and then `scores.json` (its block of `results.json`),
each written atomically, so a folder with `scores.json` is a finished model that a rerun reuses. The stage calls
`score_model` in-process for one model, or runs this module in a child process per model when it scores several:

    python -m distill.scoring --recipe <work>/models/recipe.json --label base --model <dir> --out <work>/models/base

The child reads the resolved recipe from JSON (validated by the stage already, so the pass-through checks, which
import vLLM and TRL, are not run again) and loads the benchmarks itself; its logs go to stderr like the stage's.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill import files
from distill.data import Loaded, last_boxed, load_source
from distill.errors import RecipeError
from distill.prompts import source_prompts
from distill.records import CUT_SHORT, Problem, Trace
from distill.schema import Recipe, Teacher

log = logging.getLogger(__name__)
SAMPLES = "samples.jsonl"
STUDENT = "student"  # the label of the model the stage evaluates (the others are references: compare_base)
SCORES = "scores.json"


def score_model(recipe: Recipe, model: str, benchmarks: list[Loaded], *, label: str, out: Path) -> dict[str, Any]:
    """Generate, verify and score `model` on every benchmark. Writes `out/samples.jsonl` (rows in benchmark, problem,
    sample order, each tagged with `label`), then `out/scores.json`, and returns what the latter holds: `model`, and
    `benchmarks`, `domains` (per answer kind) and `overall` scores. The engine is shut down before returning."""
    # Imported here, not at the top: `distill.pass_at_k` imports Hugging Face `evaluate` (~5 s), and in a child this
    # module is `__main__`, which every verification worker (fork server) imports again before its first trace.
    from distill.pass_at_k import score
    from teacher.generate import generate_traces
    from teacher.traces import GenerationStats

    teacher = fitted(as_teacher(recipe, model), label=label)
    prompts = source_prompts(recipe.eval.benchmarks, teacher=teacher, where="eval.benchmarks")
    per_benchmark = {}
    by_kind: dict[str, tuple[list[list[str]], list[list[bool]]]] = {}
    with _engine(teacher) as llm, files.atomic_open(out / SAMPLES) as handle:
        engine = _check_prompts(recipe, teacher, llm, benchmarks, prompts=prompts, label=label) if llm else {}
        for loaded in benchmarks:
            stats = GenerationStats()
            traces = generate_traces(loaded.problems, teacher=teacher, stats=stats, llm=llm, prompts=prompts)
            answers, verdicts, rows = judge(loaded.problems, traces, n=teacher.sampling["n"], recipe=recipe)
            for row in rows:
                handle.write(files.json_line({"model": label, "benchmark": loaded.spec.name, **row}))
            scores = score(answers, verdicts, k=recipe.eval.pass_k)
            scores["prompt_too_long"] = len(stats.skipped_ids)
            per_benchmark[loaded.spec.name] = {"kind": loaded.spec.kind, **scores}
            kind_answers, kind_verdicts = by_kind.setdefault(loaded.spec.kind, ([], []))
            kind_answers += answers
            kind_verdicts += verdicts
            log.info("%s on %s: %s", label, loaded.spec.name, _brief(scores))
    domains = {kind: score(a, v, k=recipe.eval.pass_k) for kind, (a, v) in by_kind.items()}
    all_answers = [keys for answers, _ in by_kind.values() for keys in answers]
    all_verdicts = [oks for _, verdicts in by_kind.values() for oks in verdicts]
    overall = score(all_answers, all_verdicts, k=recipe.eval.pass_k)
    scored = {"model": model, **engine, "benchmarks": per_benchmark, "domains": domains, "overall": overall}
    files.write_json(out / SCORES, scored)
    return scored


def finished(out: Path, *, model: str) -> dict[str, Any] | None:
    """The scores in `out` if it holds a finished scoring of `model` (both files there, the same model path), else
    None: that model is to be scored (again)."""
    if not ((out / SCORES).is_file() and (out / SAMPLES).is_file()):
        return None
    scored = files.read_json(out / SCORES)
    return scored if scored.get("model") == model else None


@contextlib.contextmanager
def _engine(teacher: Teacher) -> Iterator[Any]:
    """The `vllm.LLM` for `teacher` (None for an endpoint), shut down on the way out (`teacher.offline.serving`).
    Only a process exit frees everything for certain, hence one child per model when the stage scores several."""
    if teacher.backend != "vllm":
        yield None
        return
    from teacher.offline import serving

    with serving(teacher) as llm:
        yield llm


def fitted(teacher: Teacher, *, label: str) -> Teacher:
    """`teacher` with an engine its model can start: a `max_model_len` above the model's context (the trained
    student's, extended by `student.base_config`) is an error for the student, while the untrained base of
    `compare_base` keeps its own shorter context, with a warning: its answers past it are cut and counted wrong."""
    from distill import lengths

    limit = teacher.engine.get("max_model_len")
    context = lengths.model_context(teacher.model) if teacher.backend == "vllm" and limit else None
    if context is None or limit <= context:
        return teacher
    message = (
        f"eval.engine.max_model_len: {limit} is longer than {label}'s context ({context} positions, {teacher.model})"
    )
    if label == STUDENT:
        raise RecipeError(f"{message}; lower it, or extend the student's context with student.base_config")
    log.warning(
        "%s: %s is scored with its own %d, so its answers past it are cut and counted wrong", message, label, context
    )
    return teacher.model_copy(update={"engine": {**teacher.engine, "max_model_len": context}})


def _check_prompts(
    recipe: Recipe, teacher: Teacher, llm: Any, benchmarks: list[Loaded], *, prompts: dict[str, str], label: str
) -> dict[str, int]:
    """The longest rendered prompt against the engine: for the student, a prompt plus max_tokens that cannot fit is
    an error before any sample is drawn (its answers would be cut and counted wrong); for a reference model, a
    warning. Returns what the results record of it."""
    from distill import lengths
    from distill.prompts import generation_prompt, messages

    tokenizer = llm.get_tokenizer()
    max_model_len = llm.llm_engine.model_config.max_model_len
    longest = max(
        len(
            tokenizer.encode(
                generation_prompt(tokenizer, chat, think_prefix=teacher.think_prefix), add_special_tokens=False
            )
        )
        for loaded in benchmarks
        for chat in (messages(problem, teacher=teacher, prompts=prompts) for problem in loaded.problems)
    )
    problem = lengths.eval_prompt_problem(recipe, max_model_len=max_model_len, longest_prompt=longest, label=label)
    if problem and label == STUDENT:
        raise RecipeError(problem)
    if problem:
        log.warning("%s (%s: its answers past it are counted wrong)", problem, label)
    return {"max_model_len": max_model_len, "longest_prompt_tokens": longest}


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


def main(argv: list[str] | None = None) -> int:
    """The child process of the eval stage: score one model into its folder. Exits non-zero (with the traceback on
    stderr) when scoring fails; the stage turns that into an error naming the model."""
    parser = argparse.ArgumentParser(prog="python -m distill.scoring", description=main.__doc__)
    parser.add_argument("--recipe", type=Path, required=True, help="the resolved recipe as JSON")
    parser.add_argument("--label", required=True, help="the model's name in the results: student, base")
    parser.add_argument("--model", required=True, help="the model folder (or hub id) to serve")
    parser.add_argument("--out", type=Path, required=True, help="the model's results folder")
    parser.add_argument("--log-level", type=int, default=logging.INFO, help="the stage's log level (20: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [{args.label}]: %(message)s",
        datefmt="%H:%M:%S",
    )
    recipe = Recipe.model_validate(files.read_json(args.recipe))
    benchmarks = [load_source(source) for source in recipe.eval.benchmarks]
    score_model(recipe, args.model, benchmarks, label=args.label, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
