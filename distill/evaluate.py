"""Stage `eval`: score a model on the recipe's benchmarks with R1's protocol.

For each benchmark, k samples per problem (`eval.sampling.n`, temperature 0.6, top_p 0.95 by default) are drawn
through the teacher's own generation entry point (the same prompt and `<think>` forcing the student was trained
with), verified with the filter's verifiers (same reasons, same timeouts), and scored with `distill/pass_at_k.py`
(also an `evaluate` module): pass@1 as the mean over the k samples, the unbiased pass@k, and maj@k. A sample cut by
`max_tokens` (or without `</think>`) is wrong, not an error; a problem whose prompt does not fit the model is
counted wrong and reported. With `eval.compare_base`, the base model is scored on the same problems.

Each model is scored into its own folder, `models/<label>/` (`distill.scoring`), as soon as it finishes; the
outputs are then merged from those folders: `samples.jsonl` (prompt, completion, extracted answer, verdict per
sample, student first), `results.json`, `results.md`. The work directory outlives a failed run (it is named by the
stage fingerprint), so a rerun reuses every finished model and scores only the rest.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distill import eval_report, files, intervals
from distill.data import Loaded, load_source
from distill.errors import DistillError
from distill.pipeline import StageContext, StageReport, student_stage
from distill.schema import Recipe
from distill.scoring import SAMPLES, SCORES, STUDENT, Job, finished, score_jobs

log = logging.getLogger(__name__)
MODELS = "models"  # <work_dir>/models/<label>/: one finished model's samples.jsonl + scores.json


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    cfg = recipe.eval
    models = {STUDENT: ctx.options.model or cfg.model or str(ctx.inputs[student_stage(recipe)])}
    if cfg.compare_sft and "onpolicy" in ctx.inputs and "train" in ctx.inputs:
        models["sft"] = str(ctx.inputs["train"])
    if cfg.compare_base and recipe.student is not None:  # the schema requires student with compare_base
        models["base"] = recipe.student.model
    models = {label: servable(model, scratch=ctx.run_dir / ".work") for label, model in models.items()}
    benchmarks = [load_source(source) for source in cfg.benchmarks]  # at least one: the schema says so
    log.info(
        "eval: %s on %s, k=%d, max_tokens=%s, %d run(s), thinking budgets %s",
        ", ".join(models.values()),
        ", ".join(f"{b.spec.name} ({len(b.problems)})" for b in benchmarks),
        cfg.sampling["n"],
        cfg.sampling.get("max_tokens"),
        cfg.repeat,
        cfg.thinking_budgets or "none",
    )
    jobs, seeds = plan_jobs(recipe, models)
    scored = score_all(recipe, jobs, benchmarks, work_dir=ctx.work_dir)
    results: dict[str, Any] = {
        "k": cfg.sampling["n"],
        "sampling": cfg.sampling,
        "interval_method": intervals.METHOD,
        **{label: scored[label] for label in models},
    }
    results["benchmarks"] = results[STUDENT]["benchmarks"]  # what cards and tables read
    samples = {label: ctx.work_dir / MODELS / label / SAMPLES for label in jobs}
    problems = {b.spec.name: [p.id for p in b.problems] for b in benchmarks}
    if len(models) > 1:
        results["paired"] = eval_report.paired_differences(samples, problems, labels=list(models))
    if cfg.repeat > 1:
        results["repeats"] = {
            label: eval_report.repeat_spread(
                [scored[label], *(scored[eval_report.repeat_label(label, s)] for s in seeds[1:])], seeds
            )
            for label in models
        }
    if cfg.thinking_budgets:
        points = {b: scored[eval_report.budget_label(STUDENT, b)] for b in cfg.thinking_budgets}
        results["budgets"] = {STUDENT: eval_report.budget_curve(scored[STUDENT], points)}
        eval_report.budget_chart(results["budgets"], ctx.work_dir / "budgets.png")
    if len(jobs) > len(models):  # every scoring's full block: the repeats' and the budget points'
        results["runs"] = {label: block for label, block in scored.items() if label not in models}
    count = merge_samples(ctx.work_dir, labels=list(jobs))
    files.write_json(ctx.work_dir / "results.json", results)
    files.write_text(ctx.work_dir / "results.md", eval_report.results_table(results))
    dropped = {reason: n for b in benchmarks for reason, n in b.dropped.items()}
    return StageReport(
        counts={"in": sum(len(ids) for ids in problems.values()), "out": count, "dropped": dropped},
        extra={
            **{label: results[label]["overall"] for label in models},
            "reproducibility": {label: scored[label]["record"] for label in jobs},
        },
    )


def plan_jobs(recipe: Recipe, models: dict[str, str]) -> tuple[dict[str, Job], list[int]]:
    """Every scoring the stage runs, by label: each model, its repeats (seeds `engine.seed` + 1, 2, ...), and the
    evaluated model's budget-curve points at the recipe's seed (a reference model's curve is its own eval, with
    `eval.model`). Returns them and the seeds of the repeats, the recipe's first."""
    cfg = recipe.eval
    first = int(cfg.engine.get("seed") or 0)
    seeds = [first + r for r in range(cfg.repeat)]
    jobs = {label: Job(model) for label, model in models.items()}
    for label, model in models.items():
        for seed in seeds[1:]:
            jobs[eval_report.repeat_label(label, seed)] = Job(model, seed=seed)
    for tokens in cfg.thinking_budgets:
        jobs[eval_report.budget_label(STUDENT, tokens)] = Job(models[STUDENT], thinking_budget=tokens)
    return jobs, seeds


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
    log.info("%s is a LoRA adapter; merging it into its base in %s", model, scratch)
    return str(merge_adapter(folder, out=scratch))


def score_all(recipe: Recipe, jobs: dict[str, Job], benchmarks: list[Loaded], *, work_dir: Path) -> dict[str, Any]:
    """Each job's scores by label, in `jobs` order (benchmarks in the recipe's): reused from a finished
    `models/<label>/`, or scored now, the jobs of one engine (same model and seed) together.

    Two or more engines on vLLM run one per child process: only a process exit frees an engine's GPU memory for
    certain, and the next engine's start-up check needs it free. A single one (a plain eval, or the one a rerun has
    left) is scored in this process, as no engine follows it here and a child would cost another vLLM import
    (about 15 s on a CPU, paid in every demo run). A failed child does not stop the engines after it; the stage then
    fails naming every failed job, and a rerun scores only those."""
    scored: dict[str, dict[str, Any]] = {}
    for label, job in jobs.items():
        kept = finished(work_dir / MODELS / label, model=job.model)
        if kept is not None:
            log.info("eval: %s (%s) already scored in %s: reusing its results", label, job.model, work_dir / MODELS)
            scored[label] = kept
    groups: dict[tuple[str, int | None], dict[str, Job]] = {}
    for label, job in jobs.items():
        if label not in scored:
            groups.setdefault(job.engine_key, {})[label] = job
    in_children = len(groups) > 1 and recipe.eval.endpoint is None
    recipe_json = work_dir / MODELS / "recipe.json"  # what the children read; removed after them
    if in_children:
        files.write_json(recipe_json, recipe.model_dump(mode="json"))
    failed = []
    try:
        for group in groups.values():
            t0, names = time.monotonic(), ", ".join(group)
            if in_children:
                code = _score_in_child(group, out=work_dir / MODELS, recipe_json=recipe_json)
                for label, job in group.items():
                    kept = finished(work_dir / MODELS / label, model=job.model)
                    if code != 0 or kept is None:
                        why = f"exit code {code}" if code else f"exited 0 but wrote no {label}/{SCORES}"
                        failed.append(f"{label} ({job.model}): {why}")
                    else:
                        scored[label] = kept
            else:
                scored.update(score_jobs(recipe, group, benchmarks, out=work_dir / MODELS))
            where = "a child process" if in_children else "this process"
            log.info("eval: %s scored in %s in %.1f s", names, where, time.monotonic() - t0)
    finally:
        recipe_json.unlink(missing_ok=True)
    if failed:
        kept = [label for label in jobs if label in scored]
        raise DistillError(
            f"eval: scoring failed for {'; '.join(failed)} (the log above says why). The finished models' results "
            f"are kept in {work_dir / MODELS} ({', '.join(kept) or 'none yet'}); fix the failed model and rerun the "
            "same command: it reuses them and scores only the rest."
        )
    return {label: _in_recipe_order(scored[label], benchmarks) for label in jobs}


def _in_recipe_order(scored: dict[str, Any], benchmarks: list[Loaded]) -> dict[str, Any]:
    """Benchmarks and domains in the recipe's order, which `results.md` rows follow: `scores.json` read back from
    disk has them key-sorted."""
    kinds = dict.fromkeys(loaded.spec.kind for loaded in benchmarks)
    return {
        **scored,
        "benchmarks": {loaded.spec.name: scored["benchmarks"][loaded.spec.name] for loaded in benchmarks},
        "domains": {kind: scored["domains"][kind] for kind in kinds},
    }


def _score_in_child(jobs: dict[str, Job], *, out: Path, recipe_json: Path) -> int:
    """Score the jobs of one engine with `python -m distill.scoring` in a child that inherits this process's
    environment (vLLM and thread settings, offline flags) and writes its logs, stdout included, to this process's
    stderr. Returns its exit code."""
    job = next(iter(jobs.values()))
    specs = [label if j.thinking_budget is None else f"{label}:{j.thinking_budget}" for label, j in jobs.items()]
    command = [
        sys.executable,
        "-m",
        "distill.scoring",
        *("--recipe", str(recipe_json), "--model", job.model, "--out", str(out)),
        *(arg for spec in specs for arg in ("--job", spec)),
        *("--log-level", str(log.getEffectiveLevel())),
        *(("--seed", str(job.seed)) if job.seed is not None else ()),
    ]
    log.info("eval: scoring %s in a child process: %s", ", ".join(jobs), shlex.join(command))
    sys.stderr.flush()
    return subprocess.run(command, stdout=sys.stderr, check=False).returncode


def merge_samples(work_dir: Path, *, labels: list[str]) -> int:
    """Concatenate the models' `samples.jsonl` into the stage's, in `labels` order (student first, as one pass
    over the models wrote it before); returns the number of rows."""
    count = 0
    with files.atomic_open(work_dir / SAMPLES) as merged:
        for label in labels:
            with (work_dir / MODELS / label / SAMPLES).open(encoding="utf-8") as rows:
                for row in rows:
                    merged.write(row)
                    count += 1
    return count
