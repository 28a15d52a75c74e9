"""What each CLI command does, kept apart from argument parsing so both read top to bottom."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from distill import pipeline
from distill.errors import DistillError, RecipeError
from distill.recipe import check_resources, dump_recipe, load_recipe
from distill.schema import Recipe

log = logging.getLogger("distill")


def _options(args: argparse.Namespace) -> pipeline.StageOptions:
    return pipeline.StageOptions(
        shard=getattr(args, "shard", (0, 1)),
        model=getattr(args, "model", None),
        dry_run=getattr(args, "dry_run", False),
        progress=not args.no_progress and sys.stderr.isatty(),
    )


def _load(args: argparse.Namespace) -> Recipe:
    """The recipe with `--set` overrides, then the eval flags that are recipe fields under another name (so they
    are part of the stage's fingerprint like any recipe value)."""
    overrides = list(args.overrides)
    if getattr(args, "repeat", None) is not None:
        overrides.append(f"eval.repeat={args.repeat}")
    if getattr(args, "budgets", None):
        overrides.append(f"eval.thinking_budgets=[{','.join(map(str, args.budgets))}]")
    recipe = load_recipe(args.recipe, overrides=overrides)
    log.info("recipe %s (%s)", recipe.name, args.recipe)
    return recipe


def stage(args: argparse.Namespace) -> int:
    recipe = _load(args)
    manifest = pipeline.run_stage(
        recipe, args.command, runs_dir=args.runs_dir, options=_options(args), force=args.force
    )
    if manifest is not None:
        log.info("%s: %s", args.command, _summary(manifest.counts))
    return 0


def run(args: argparse.Namespace) -> int:
    recipe = _load(args)
    for manifest in pipeline.run_all(
        recipe, runs_dir=args.runs_dir, options=_options(args), force=frozenset(args.force)
    ):
        log.info("%-8s %s (%.1fs)", manifest.stage, _summary(manifest.counts), manifest.wall_s)
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Check every variant, run them (sharing equal stages), write runs/<sweep>/report.md; exit 1 if any failed."""
    import dataclasses
    import time

    from distill import sweep as sweeps
    from distill import sweep_report

    if args.parallel < 1:
        raise DistillError(f"--parallel {args.parallel}: expected 1 or more variants at once")
    started = time.monotonic()
    plan = sweeps.load_sweep(
        args.recipe, grid=args.grid, common=args.overrides, name=args.name, baseline=args.baseline
    )
    log.info("sweep %s: %d variants (%s)", plan.name, len(plan.variants), ", ".join(v.name for v in plan.variants))
    failed: dict[str, str] = {}
    if not args.report_only:
        options = _options(args)
        if args.parallel > 1:
            options = dataclasses.replace(options, progress=False)  # K processes share one terminal
        failed = sweeps.run(plan, runs_dir=args.runs_dir, options=options, parallel=args.parallel)
    elapsed = None if args.report_only else time.monotonic() - started
    path = sweep_report.write(plan, runs_dir=args.runs_dir, failed=failed, elapsed_s=elapsed)
    print(path.read_text(encoding="utf-8"))
    if failed:
        print(f"error: {len(failed)} variant(s) failed: {', '.join(failed)} (see {path})", file=sys.stderr)
        return 1
    return 0


def status(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    table = Table(title=f"runs/{recipe.name}")
    columns = ("stage", "state", "in", "out", "finished", "superseded")
    for column in columns:
        table.add_column(column)
    for row in pipeline.status(recipe, runs_dir=args.runs_dir):
        table.add_row(*(str(row[c]) for c in columns))
    Console(width=119).print(table)
    return 0


def gc(args: argparse.Namespace) -> int:
    """List the run's superseded outputs, or with `--remove` delete them (all but the newest `--keep` per stage)."""
    from distill import superseded

    if args.keep is not None and not args.remove:
        raise DistillError("--keep N says what `--remove` spares: use it with --remove")
    recipe = load_recipe(args.recipe, overrides=args.overrides)
    run_dir = args.runs_dir / recipe.name
    if args.remove:
        removed = superseded.remove(run_dir, keep=args.keep or 0)
        size = superseded.human(sum(e.size for e in removed))
        print(f"removed {len(removed)} superseded outputs ({size}) from {run_dir / superseded.SUPERSEDED}")
        return 0
    entries = superseded.entries(run_dir)
    table = Table(title=f"{run_dir / superseded.SUPERSEDED}")
    for column in ("stage", "fingerprint", "size", "finished", "path"):
        table.add_column(column)
    for entry in entries:
        size = superseded.human(entry.size)
        table.add_row(entry.stage, entry.key, size, entry.manifest.finished_at, str(entry.path))
    Console(width=159).print(table)
    print(f"{len(entries)} superseded outputs, {superseded.human(sum(e.size for e in entries))}")
    return 0


def recipe(args: argparse.Namespace) -> int:
    if args.recipe_command == "show":
        print(dump_recipe(load_recipe(args.recipe, overrides=args.overrides)), end="")
    elif args.recipe_command == "check":
        for path in args.recipes:
            problems, notes = check_resources(load_recipe(path))
            if problems:
                raise RecipeError("\n".join(f"{path}: {line}" for line in problems))
            for note in notes:
                log.info("%s: %s", path, note)
            print(f"{path}: ok")
    elif args.recipe_command == "plan":
        import json
        import os

        from distill import scale

        gpus = args.gpus or int(os.environ.get("NNODES", "1")) * int(os.environ.get("NPROC_PER_NODE", "1"))
        figures = scale.plan(load_recipe(args.recipe, overrides=args.overrides), runs_dir=args.runs_dir, gpus=gpus)
        print(json.dumps(figures, indent=1) if args.json else scale.render(figures), end="\n" if args.json else "")
    elif args.readme:
        from distill.reference import update_readme

        update_readme(args.readme)
    else:
        from distill.reference import recipe_reference

        print(recipe_reference(), end="")
    return 0


def tiny_model(args: argparse.Namespace) -> int:
    from distill.tinymodel import build_tiny_model

    corpus = args.corpus.read_text(encoding="utf-8").splitlines() if args.corpus else None
    build_tiny_model(
        args.out,
        arch=args.arch,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        vocab_size=args.vocab_size,
        corpus=corpus,
        seed=args.seed,
    )
    print(args.out)
    return 0


def demo(args: argparse.Namespace) -> int:
    from distill.demo.command import main

    return main(args, recipe=_load(args), options=_options(args))


def verify(args: argparse.Namespace) -> int:
    """Standalone verifier of any trace file (distill.filter.standalone)."""
    from distill.filter import standalone

    return standalone.main(args)


def merge(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into its base (student.merge)."""
    from student import merge as student_merge

    return student_merge.main(args)


def _summary(counts: dict) -> str:
    dropped = counts.get("dropped") or {}
    text = f"in {counts.get('in', '?')} → out {counts.get('out', '?')}"
    return text + (f", dropped {dropped}" if dropped else "")
