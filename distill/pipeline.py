"""The stage runner: which stage reads what, when a stage is done, stale or missing, and the crash-safe swap.

Each stage is a module with one public function

    run(recipe: Recipe, *, ctx: StageContext) -> StageReport

that writes its outputs under `ctx.work_dir`. The runner owns everything else: it picks the work directory (named
by the stage fingerprint, so a changed recipe never mixes with an older partial run), writes `manifest.json` last,
and swaps the finished work directory into `runs/<name>/<stage>/`. The output it replaces is moved aside to
`runs/<name>/.superseded/<stage>-<fingerprint>/`, not deleted, and is restored instead of re-run when the recipe
comes back to that fingerprint (`distill.superseded`). A kill at any moment leaves the previous finished output in
place (or in `.superseded/`, from where the next run restores it); a rerun resumes in the same work directory (the
teacher continues from its durable shards there).
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from distill import files, superseded
from distill.errors import DistillError
from distill.manifest import Manifest, canonical_hash, read_manifest, write_manifest
from distill.recipe import section
from distill.schema import Recipe

log = logging.getLogger(__name__)
WORK = ".work"


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # imported only when the stage runs, so the CLI starts without vLLM/torch/TRL
    sections: tuple[str, ...]  # dotted recipe paths the stage reads: their hash decides staleness
    upstream: tuple[str, ...]  # stages whose outputs it reads
    needs: str  # recipe section that must be present for the stage to be configured
    reads: Callable[[Recipe, StageOptions], tuple[str, ...]] | None = None  # upstream actually read, if it varies
    operational: tuple[str, ...] = ()  # dotted paths inside `sections` that change how, not what: not hashed
    # reads the recipe's problems: the runner loads them once (`module.load`), their content hash
    # (`module.problems_hash`) is part of the stage's input, and `run` gets them in `ctx.problems`
    problems: bool = False
    sends: bool = False  # acts outside runs/ (the Hub): a superseded record of a send is restored only for dry runs

    def upstream_read(self, recipe: Recipe, options: StageOptions) -> tuple[str, ...]:
        return self.reads(recipe, options) if self.reads else self.upstream


# Endpoint URL, key variable, concurrency, streaming, timeouts, retries (and the finish reasons retried) and prices
# change how traces are fetched, not which: a generation resumes across them (e.g. shards talking to different
# servers). `extra_body` changes what is generated, so it stays in the fingerprint.
ENDPOINT_HOW = tuple(
    f"teacher.endpoint.{key}"
    for key in (
        "base_url",
        "api_key_env",
        "max_concurrency",
        "stream",
        "timeout_s",
        "max_retries",
        "backoff_s",
        "retry_finish_reasons",
        "price_input_per_m",
        "price_output_per_m",
    )
)


def _eval_reads(recipe: Recipe, options: StageOptions) -> tuple[str, ...]:
    """Eval reads the trained student only when no other model is named (`--model` or `eval.model`): the
    on-policy stage's when it is configured, else the train stage's (and with `compare_sft`, both)."""
    if options.model or (recipe.eval and recipe.eval.model):
        return ()
    sft = ("train",) if recipe.onpolicy is not None and recipe.eval and recipe.eval.compare_sft else ()
    return (student_stage(recipe), *sft)


def _push_reads(recipe: Recipe, options: StageOptions) -> tuple[str, ...]:
    return ("filter", student_stage(recipe), "eval")


def student_stage(recipe: Recipe) -> str:
    """The stage whose output is the finished student: `onpolicy` when configured (it starts from `train`'s)."""
    return "onpolicy" if recipe.onpolicy is not None else "train"


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "generate",
            "teacher.generate",
            ("data", "mixture", "teacher"),
            (),
            "teacher",
            operational=ENDPOINT_HOW,
            problems=True,
        ),
        Stage("filter", "distill.filter.stage", ("filter", "student.model"), ("generate",), "filter"),
        Stage("train", "student.train", ("student",), ("filter",), "student"),
        Stage(
            "onpolicy",
            "student.onpolicy",
            ("onpolicy", "data", "teacher.model", "teacher.prompt", "teacher.system_prompt", "teacher.think_prefix"),
            ("train",),
            "onpolicy",
            problems=True,
        ),
        Stage(
            "eval",
            "distill.evaluate",
            ("eval", "student.model", "teacher.prompt", "teacher.think_prefix"),
            ("train", "onpolicy"),
            "eval",
            reads=_eval_reads,
        ),
        Stage(
            "push",
            "distill.hub",
            ("hub",),
            ("filter", "train", "onpolicy", "eval"),
            "hub",
            reads=_push_reads,
            sends=True,
        ),
    )
}


@dataclass(frozen=True)
class StageOptions:
    """Command-line options of single-stage commands. Those that change the output are part of the fingerprint."""

    shard: tuple[int, int] = (0, 1)  # generate: this job's shard i of N (work split, not part of the fingerprint)
    model: str | None = None  # eval: evaluate this model instead of the train output
    dry_run: bool = False  # push: stage the repo folders without network
    progress: bool = True  # progress bars (off for --no-progress and non-TTY runs)

    def fingerprint(self, stage: str) -> dict[str, Any]:
        """The options that change this stage's output: `--model` for eval, `--dry-run` for push, none elsewhere
        (so `distill run --dry-run` reuses the generate/filter/train/eval outputs of a plain `distill run`)."""
        return {"eval": {"model": self.model}, "push": {"dry_run": self.dry_run}}.get(stage, {})


@dataclass
class StageContext:
    run_dir: Path  # runs/<name>
    work_dir: Path  # where the stage writes; swapped into run_dir/<stage> on success
    inputs: dict[str, Path]  # finished upstream stage directories by stage name
    options: StageOptions
    problems: Any = None  # what `module.load(recipe)` returned, for a stage that reads the recipe's problems


@dataclass
class StageReport:
    """What a stage returns. `counts` is {"in": n, "out": n, "dropped": {reason: n}}; `complete=False` means
    this call did its share (e.g. one shard of N) and the stage is not finished yet."""

    counts: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = True


def stage_module(stage: Stage) -> ModuleType:
    return importlib.import_module(stage.module)


def configured(recipe: Recipe, stage: Stage) -> bool:
    return getattr(recipe, stage.needs) is not None


def section_hash(recipe: Recipe, stage: Stage, options: StageOptions) -> str:
    sections = {s: section(recipe, s) for s in stage.sections}
    for dotted in stage.operational:
        head, _, rest = dotted.partition(".")
        node = sections.get(head)
        *parents, leaf = rest.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return canonical_hash({"sections": sections, **options.fingerprint(stage.name)})


def input_hash(recipe: Recipe, stage: Stage, run_dir: Path, options: StageOptions) -> tuple[str, dict[str, Path]]:
    """Hash of the finished upstream outputs this stage reads (and of its problems' content), and the upstream
    directories."""
    parts, inputs = input_parts(recipe, stage, run_dir, options)
    if stage.problems:
        parts["problems"] = load_problems(recipe, stage)[1]
    return canonical_hash(parts), inputs


def input_parts(
    recipe: Recipe, stage: Stage, run_dir: Path, options: StageOptions
) -> tuple[dict[str, str], dict[str, Path]]:
    """The output hashes of the finished upstream stages this stage reads, and their directories. Unconfigured
    upstream stages are skipped; a configured one that has not finished is an error naming the command to run."""
    hashes, inputs = {}, {}
    for name in stage.upstream_read(recipe, options):
        upstream = STAGES[name]
        if not configured(recipe, upstream):
            continue
        manifest = read_manifest(run_dir / name)
        if manifest is None:
            raise DistillError(f"stage {stage.name} needs the output of {name}: run `distill {name}` first")
        hashes[name] = manifest.output_hash
        inputs[name] = run_dir / name
    return hashes, inputs


def load_problems(recipe: Recipe, stage: Stage) -> tuple[Any, str]:
    """The problems a `problems` stage reads, loaded once, and their content hash."""
    module = stage_module(stage)
    loaded = module.load(recipe)
    return loaded, module.problems_hash(loaded)


def _state(recipe: Recipe, stage: Stage, run_dir: Path, manifest: Manifest | None) -> str:
    if not configured(recipe, stage):
        return "not configured"
    if manifest is None:
        work = run_dir / WORK
        return "partial" if work.is_dir() and any(work.glob(f"{stage.name}-*")) else "missing"
    if manifest.section_hash != section_hash(recipe, stage, StageOptions()):
        return "stale"
    try:
        parts, _ = input_parts(recipe, stage, run_dir, StageOptions())
    except DistillError:
        return "stale"
    if stage.problems:  # judged by the manifest: a dataset is loaded (and re-hashed) only when the stage runs
        if "problems" not in manifest.inputs:  # written before manifests listed their inputs
            return "done" if input_hash(recipe, stage, run_dir, StageOptions())[0] == manifest.input_hash else "stale"
        parts["problems"] = manifest.inputs["problems"]
    return "done" if canonical_hash(parts) == manifest.input_hash else "stale"


def status(recipe: Recipe, *, runs_dir: Path) -> list[dict[str, Any]]:
    """One row per stage: done / stale / missing / partial / not configured, with counts, finish time and the
    superseded outputs kept for it (count and size, so `distill gc` is not a surprise). Read from manifests: a
    changed recipe or upstream output shows as stale; changed contents of a dataset file only when a stage runs."""
    run_dir = runs_dir / recipe.name
    kept = superseded.summary(run_dir)
    rows = []
    for stage in STAGES.values():
        count, size = kept.get(stage.name, (0, 0))
        manifest = read_manifest(run_dir / stage.name)
        rows.append(
            {
                "stage": stage.name,
                "state": _state(recipe, stage, run_dir, manifest),
                "in": manifest.counts.get("in", "") if manifest else "",
                "out": manifest.counts.get("out", "") if manifest else "",
                "finished": manifest.finished_at if manifest else "",
                "superseded": f"{count} ({superseded.human(size)})" if count else "",
            }
        )
    return rows


def run_stage(
    recipe: Recipe, name: str, *, runs_dir: Path, options: StageOptions, force: bool = False
) -> Manifest | None:
    """Run one stage unless its manifest already matches (same sections, same input). Returns the manifest, or
    None when this call finished only its share of a sharded stage."""
    stage = STAGES[name]
    if not configured(recipe, stage):
        raise DistillError(f"stage {name} needs a `{stage.needs}` section in the recipe")
    run_dir = runs_dir / recipe.name
    out_dir = run_dir / name
    sections = section_hash(recipe, stage, options)
    parts, inputs = input_parts(recipe, stage, run_dir, options)
    loaded = None
    if stage.problems:
        loaded, parts["problems"] = load_problems(recipe, stage)
    inputs_hash = canonical_hash(parts)
    previous = read_manifest(out_dir)
    if previous and not force and (previous.section_hash, previous.input_hash) == (sections, inputs_hash):
        log.info("%s: cached (manifest matches: section %s, input %s)", name, sections[:12], inputs_hash[:12])
        return previous
    work_dir = run_dir / WORK / f"{name}-{superseded.fingerprint(sections, inputs_hash)}"
    if not force and (not stage.sends or options.dry_run):  # a restored push record would not push again
        restored = superseded.restore(run_dir, name, sections, inputs_hash)
        if restored is not None:
            return restored
    finished = read_manifest(work_dir)
    if not force and finished and (finished.section_hash, finished.input_hash) == (sections, inputs_hash):
        log.info("%s: finished in %s before a kill; swapping it in", name, work_dir)  # killed between two renames
        superseded.swap_in(run_dir, work_dir, out_dir)
        return finished
    if previous:
        changed = [
            w
            for w, a, b in (
                ("recipe section", previous.section_hash, sections),
                ("input", previous.input_hash, inputs_hash),
            )
            if a != b
        ]
        log.info("%s: re-running (%s)", name, "forced" if force else f"{' and '.join(changed)} changed")
    work_dir.mkdir(parents=True, exist_ok=True)
    if force and options.shard == (0, 1):  # a forced shard of N must not wipe the other shards' work
        _clear(work_dir)
    module = stage_module(stage)
    started, t0 = _now(), time.monotonic()
    report: StageReport = module.run(recipe, ctx=StageContext(run_dir, work_dir, inputs, options, problems=loaded))
    if not report.complete:
        log.info("%s: this share is done; the stage finishes when every share is", name)
        return None
    manifest = Manifest(
        stage=name,
        recipe=recipe.name,
        section_hash=sections,
        input_hash=inputs_hash,
        inputs=parts,
        output_hash=files.sha256_tree(work_dir),
        counts=report.counts,
        started_at=started,
        finished_at=_now(),
        wall_s=round(time.monotonic() - t0, 3),
        extra=report.extra,
    )
    write_manifest(work_dir, manifest)
    superseded.swap_in(run_dir, work_dir, out_dir)
    return manifest


def _clear(work_dir: Path) -> None:
    for child in work_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_all(
    recipe: Recipe, *, runs_dir: Path, options: StageOptions, force: frozenset[str] = frozenset()
) -> list[Manifest]:
    """Run every configured stage in order, skipping those whose manifests match. A stage whose upstream output
    changed re-runs, and so does everything after it (their input hashes change in turn)."""
    manifests = []
    for stage in STAGES.values():
        if not configured(recipe, stage):
            log.info("%s: not configured in the recipe, skipped", stage.name)
            continue
        manifest = run_stage(recipe, stage.name, runs_dir=runs_dir, options=options, force=stage.name in force)
        if manifest is not None:
            manifests.append(manifest)
    return manifests
