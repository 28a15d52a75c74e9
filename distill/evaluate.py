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

from distill import files
from distill.data import Loaded, load_source
from distill.errors import DistillError
from distill.pipeline import StageContext, StageReport, student_stage
from distill.schema import Recipe
from distill.scoring import SAMPLES, SCORES, finished, score_model

log = logging.getLogger(__name__)
MODELS = "models"  # <work_dir>/models/<label>/: one finished model's samples.jsonl + scores.json


def run(recipe: Recipe, *, ctx: StageContext) -> StageReport:
    cfg = recipe.eval
    models = {"student": ctx.options.model or cfg.model or str(ctx.inputs[student_stage(recipe)])}
    if cfg.compare_sft and "onpolicy" in ctx.inputs and "train" in ctx.inputs:
        models["sft"] = str(ctx.inputs["train"])
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
    scored = score_all(recipe, models, benchmarks, work_dir=ctx.work_dir)
    results: dict[str, Any] = {"k": cfg.sampling["n"], "sampling": cfg.sampling, **scored}
    results["benchmarks"] = results["student"]["benchmarks"]  # what cards and tables read
    samples = merge_samples(ctx.work_dir, labels=list(models))
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
    log.info("%s is a LoRA adapter; merging it into its base in %s", model, scratch)
    return str(merge_adapter(folder, out=scratch))


def score_all(
    recipe: Recipe, models: dict[str, str], benchmarks: list[Loaded], *, work_dir: Path
) -> dict[str, dict[str, Any]]:
    """Each model's scores by label, in `models` order (benchmarks in the recipe's): reused from a finished
    `models/<label>/`, or scored now.

    Two or more models to score on vLLM are scored one per child process: only a process exit frees an engine's
    GPU memory for certain, and the next engine's start-up check needs it free. A single one (a plain eval, or the
    one model a rerun has left) is scored in this process, as no engine follows it here and a child would cost
    another vLLM import (about 15 s on a CPU, paid in every demo run). A failed child does not stop the models after
    it; the stage then fails naming every failed model, and a rerun scores only those."""
    scored: dict[str, dict[str, Any]] = {}
    for label, model in models.items():
        kept = finished(work_dir / MODELS / label, model=model)
        if kept is not None:
            log.info("eval: %s (%s) already scored in %s: reusing its results", label, model, work_dir / MODELS)
            scored[label] = kept
    todo = {label: model for label, model in models.items() if label not in scored}
    in_children = len(todo) > 1 and recipe.eval.endpoint is None
    recipe_json = work_dir / MODELS / "recipe.json"  # what the children read; removed after them
    if in_children:
        files.write_json(recipe_json, recipe.model_dump(mode="json"))
    failed = []
    try:
        for label, model in todo.items():
            out, t0 = work_dir / MODELS / label, time.monotonic()
            if in_children:
                code = _score_in_child(label, model, out=out, recipe_json=recipe_json)
                kept = finished(out, model=model)
                if code != 0 or kept is None:
                    why = f"exit code {code}" if code else f"exited 0 but wrote no {out / SCORES}"
                    failed.append(f"{label} ({model}): {why}")
                    continue
                scored[label] = kept
            else:
                scored[label] = score_model(recipe, model, benchmarks, label=label, out=out)
            where = "a child process" if in_children else "this process"
            log.info("eval: %s scored in %s in %.1f s", label, where, time.monotonic() - t0)
    finally:
        recipe_json.unlink(missing_ok=True)
    if failed:
        kept = [label for label in models if label in scored]
        raise DistillError(
            f"eval: scoring failed for {'; '.join(failed)} (the log above says why). The finished models' results "
            f"are kept in {work_dir / MODELS} ({', '.join(kept) or 'none yet'}); fix the failed model and rerun the "
            "same command: it reuses them and scores only the rest."
        )
    return {label: _in_recipe_order(scored[label], benchmarks) for label in models}


def _in_recipe_order(scored: dict[str, Any], benchmarks: list[Loaded]) -> dict[str, Any]:
    """Benchmarks and domains in the recipe's order, which `results.md` rows follow: `scores.json` read back from
    disk has them key-sorted."""
    kinds = dict.fromkeys(loaded.spec.kind for loaded in benchmarks)
    return {
        **scored,
        "benchmarks": {loaded.spec.name: scored["benchmarks"][loaded.spec.name] for loaded in benchmarks},
        "domains": {kind: scored["domains"][kind] for kind in kinds},
    }


def _score_in_child(label: str, model: str, *, out: Path, recipe_json: Path) -> int:
    """Score one model with `python -m distill.scoring` in a child that inherits this process's environment (vLLM
    and thread settings, offline flags) and writes its logs, stdout included, to this process's stderr. Returns
    its exit code."""
    command = [
        sys.executable,
        "-m",
        "distill.scoring",
        *("--recipe", str(recipe_json), "--label", label, "--model", model, "--out", str(out)),
        *("--log-level", str(log.getEffectiveLevel())),
    ]
    log.info("eval: scoring %s in a child process: %s", label, shlex.join(command))
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


def results_table(results: dict[str, Any]) -> str:
    """Markdown: one row per model and benchmark, then one per domain (answer kind) when there are several, then
    the overall row."""
    labels = [label for label in ("student", "sft", "base") if label in results]
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
