"""Scoring one model for stage `eval`: k samples per problem on every benchmark, judged and scored, written to the
model's own folder, which the stage later merges with the other models' (`distill.evaluate`).

A scoring's folder (`models/<label>/`) holds `samples.jsonl` (one row per sample) and then `scores.json` (its block
of `results.json`), each written atomically, so a folder with `scores.json` is a finished scoring that a rerun
reuses. Scorings of one engine (the same model and seed: a model and its budget-curve points) share it. The stage
calls `score_jobs` in-process for one engine, or runs this module in a child process per engine when it needs
several:

    python -m distill.scoring --recipe <work>/models/recipe.json --model <dir> --job student --job student@think64:64 \
        --out <work>/models

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import files, intervals
from distill.data import Loaded, last_boxed, load_source
from distill.errors import RecipeError
from distill.eval_record import reproducibility, thinking_tokens, token_use
from distill.prompts import source_prompts
from distill.records import CUT_SHORT, Problem, Trace
from distill.schema import Recipe, Teacher, ThinkingBudget

log = logging.getLogger(__name__)
SAMPLES = "samples.jsonl"
STUDENT = "student"  # the label of the model the stage evaluates (the others are references: compare_base)
SCORES = "scores.json"


def score_model(
    recipe: Recipe, model: str, benchmarks: list[Loaded], *, runs: dict[str, tuple[Path, ThinkingBudget | None]]
) -> dict[str, dict[str, Any]]:
    """Generate, verify and score `model` on every benchmark, once per run (label → its folder and thinking budget),
    all on one engine: the points of a budget curve differ only in how samples are continued, so they need no
    engine of their own (on a GPU, no second load of the model). Each run writes `out/samples.jsonl` (rows in
    benchmark, problem, sample order, each tagged with its label), then `out/scores.json`: `model`, `benchmarks`,
    `domains` (per answer kind), `overall` and the `record`. Returns those by label; the engine is shut down before
    returning."""
    import teacher as teacher_api  # the spine imports a stage package only where it is used

    first = next(iter(runs))
    teacher = fitted(as_teacher(recipe, model), label=first)
    # the verification workers start before the engine loads, once for every run and benchmark
    with verify_pool(recipe) as pool, teacher_api.engine(teacher) as llm:
        return {
            label: _score_run(
                recipe,
                teacher.model_copy(update={"thinking_budget": budget}),
                llm,
                benchmarks,
                label=label,
                out=out,
                pool=pool,
            )
            for label, (out, budget) in runs.items()
        }


def _score_run(
    recipe: Recipe, teacher: Teacher, llm: Any, benchmarks: list[Loaded], *, label: str, out: Path, pool: Any
) -> dict[str, Any]:
    import teacher as teacher_api

    prompts = source_prompts(recipe.eval.benchmarks, teacher=teacher, where="eval.benchmarks")
    per_benchmark = {}
    by_kind: dict[str, Judged] = {}
    with files.atomic_open(out / SAMPLES) as handle:
        engine = _check_prompts(recipe, teacher, llm, benchmarks, prompts=prompts, label=label) if llm else {}
        record = reproducibility(teacher, llm, prompts=prompts)
        tokenizer = llm.get_tokenizer() if llm else None
        for loaded in benchmarks:
            traces, skipped = teacher_api.sample(loaded.problems, teacher=teacher, llm=llm, prompts=prompts)
            judged = judge(loaded.problems, traces, n=teacher.sampling["n"], pool=pool, tokenizer=tokenizer)
            for row in judged.rows:
                handle.write(files.json_line({"model": label, "benchmark": loaded.spec.name, **row}))
            scores = _scores(judged, k=recipe.eval.pass_k)
            scores["prompt_too_long"] = skipped
            per_benchmark[loaded.spec.name] = {"kind": loaded.spec.kind, **scores}
            by_kind.setdefault(loaded.spec.kind, Judged()).extend(judged)
            log.info("%s on %s: %s", label, loaded.spec.name, _brief(scores))
    domains = {kind: _scores(judged, k=recipe.eval.pass_k) for kind, judged in by_kind.items()}
    overall = _scores(Judged().extend(*by_kind.values()), k=recipe.eval.pass_k)
    scored = {
        "model": teacher.model,
        **engine,
        "benchmarks": per_benchmark,
        "domains": domains,
        "overall": overall,
        "record": record,
    }
    files.write_json(out / SCORES, scored)
    return scored


@dataclass
class Judged:
    """One benchmark's (or several's) judged samples: per problem the k answer keys (for maj@k) and verdicts, and
    the per-sample rows."""

    answers: list[list[str]] = field(default_factory=list)
    verdicts: list[list[bool]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, *others: Judged) -> Judged:
        for other in others:
            self.answers += other.answers
            self.verdicts += other.verdicts
            self.rows += other.rows
        return self


def _scores(judged: Judged, *, k: list[int]) -> dict[str, Any]:
    """pass@k and maj@k, pass@1's 95% interval over problems, and the samples' token use."""
    from distill.pass_at_k import score

    scores = score(judged.answers, judged.verdicts, k=k)
    scores["interval"] = intervals.pass_rate(judged.verdicts).as_dict()
    scores["tokens"] = token_use(judged.rows)
    return scores


@dataclass(frozen=True)
class Job:
    """One scoring of one model: its engine seed (None: the recipe's) and thinking budget (None: unbudgeted). Jobs
    with the same model and seed share an engine (`engine_key`)."""

    model: str
    seed: int | None = None
    thinking_budget: int | None = None

    @property
    def engine_key(self) -> tuple[str, int | None]:
        return self.model, self.seed


def score_jobs(recipe: Recipe, jobs: dict[str, Job], benchmarks: list[Loaded], *, out: Path) -> dict[str, Any]:
    """`score_model` for jobs of one engine (same model and seed), each into `out/<label>/`: the recipe's eval
    engine reseeded (and `sampling.seed`, where the recipe sets a per-request seed that would otherwise repeat the
    same samples), and each job's thinking budget."""
    (model, seed), *others = {job.engine_key for job in jobs.values()}
    if others:
        raise ValueError(f"score_jobs: jobs of one engine only, got {sorted(jobs)}")
    if seed is not None:
        update: dict[str, Any] = {"engine": {**recipe.eval.engine, "seed": seed}}
        if "seed" in recipe.eval.sampling:
            update["sampling"] = {**recipe.eval.sampling, "seed": seed}
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update=update)})
    runs = {
        label: (
            out / label,
            None
            if job.thinking_budget is None
            else ThinkingBudget(tokens=job.thinking_budget, wait=recipe.eval.budget_wait),
        )
        for label, job in jobs.items()
    }
    return score_model(recipe, model, benchmarks, runs=runs)


def finished(out: Path, *, model: str) -> dict[str, Any] | None:
    """The scores in `out` if it holds a finished scoring of `model` (both files there, the same model path), else
    None: that model is to be scored (again)."""
    if not ((out / SCORES).is_file() and (out / SAMPLES).is_file()):
        return None
    scored = files.read_json(out / SCORES)
    return scored if scored.get("model") == model else None


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
    if label.partition("@")[0] == STUDENT:  # its repeats and budget points too
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
    if problem and label.partition("@")[0] == STUDENT:
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


def judge(problems: list[Problem], traces: list[Trace], *, n: int, pool: Any, tokenizer: Any = None) -> Judged:
    """Verify every sample in `pool` (`verify_pool`); a problem with fewer than `n` (its prompt did not fit) has the
    rest counted wrong."""
    reasons = verify(traces, pool=pool)
    by_problem: dict[str, list[tuple[Trace, str]]] = {}
    for trace, reason in zip(traces, reasons, strict=True):
        by_problem.setdefault(trace.id, []).append((trace, reason))
    judged = Judged()
    for problem in problems:
        judged_problem = by_problem.get(problem.id, [])
        missing = n - len(judged_problem)
        keys = [answer_key(trace) for trace, _ in judged_problem] + [""] * missing
        oks = [reason == "ok" for _, reason in judged_problem] + [False] * missing
        judged.answers.append(keys)
        judged.verdicts.append(oks)
        for (trace, reason), key in zip(judged_problem, keys, strict=False):
            judged.rows.append(
                {
                    "id": trace.id,
                    "sample": trace.sample,
                    "prompt": trace.prompt,
                    "completion": trace.completion,
                    "extracted": key,
                    "finish_reason": trace.finish_reason,
                    "completion_tokens": trace.completion_tokens,
                    "thinking_tokens": thinking_tokens(trace, tokenizer),
                    "verdict": {"correct": reason == "ok", "reason": reason},
                }
            )
    return judged


@contextlib.contextmanager
def verify_pool(recipe: Recipe) -> Iterator[Any]:
    """The filter's own steps and worker pool for judging samples: `truncated` (cut by max_tokens or no `</think>`),
    the answer check's reasons, `ok`. Same words, timeouts and sandbox (`filter.sandbox`) as the filter stage."""
    from distill.filter.pool import VerifyPool
    from distill.filter.steps import AnswerMatches, Truncated

    timeout_s, workers = recipe.filter.verify_timeout_s, recipe.filter.workers
    steps = [Truncated(), AnswerMatches(verify=True, timeout_s=timeout_s, sandbox=recipe.filter.sandbox)]
    with VerifyPool(steps=steps, workers=workers or os.cpu_count() or 1, timeout_s=timeout_s) as pool:
        yield pool


def verify(traces: list[Trace], *, pool: Any) -> list[str]:
    """One reason per trace, in order, problem by problem through `pool`."""
    from distill.filter.stage import worker_item

    groups: list[list[dict[str, Any]]] = []
    for index, trace in enumerate(traces):
        if index == 0 or trace.id != traces[index - 1].id:
            groups.append([])
        groups[-1].append(worker_item(trace.to_dict()))
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
    """The child process of the eval stage: score jobs of one engine into their folders. Exits non-zero (with the
    traceback on stderr) when scoring fails; the stage turns that into an error naming the jobs."""
    parser = argparse.ArgumentParser(prog="python -m distill.scoring", description=main.__doc__)
    parser.add_argument("--recipe", type=Path, required=True, help="the resolved recipe as JSON")
    parser.add_argument("--model", required=True, help="the model folder (or hub id) to serve")
    parser.add_argument("--seed", type=int, help="engine seed instead of eval.engine's (a repeated run)")
    parser.add_argument(
        "--job",
        action="append",
        required=True,
        metavar="LABEL[:BUDGET]",
        help="a label to score into OUT/LABEL, with at most BUDGET thinking tokens when given (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the folder of the jobs' folders")
    parser.add_argument("--log-level", type=int, default=logging.INFO, help="the stage's log level (20: INFO)")
    args = parser.parse_args(argv)
    jobs = {}
    for spec in args.job:
        label, _, budget = spec.partition(":")
        jobs[label] = Job(args.model, seed=args.seed, thinking_budget=int(budget) if budget else None)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [{next(iter(jobs))}]: %(message)s",
        datefmt="%H:%M:%S",
    )
    recipe = Recipe.model_validate(files.read_json(args.recipe))
    benchmarks = [load_source(source) for source in recipe.eval.benchmarks]
    score_jobs(recipe, jobs, benchmarks, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
