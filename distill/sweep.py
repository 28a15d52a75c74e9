"""`distill sweep`: recipe variants (a grid of `--set` values, or named override lists) run through the stage
cache, compared in one report.

    distill sweep recipes/demo.yaml --grid student.sft.learning_rate=1e-3,3e-3 \
        --grid filter.selection=all_correct,shortest_correct
    distill sweep recipes/sweeps/demo-lr.yaml      # the same, declared in a file (`sweep:` section, below)

A sweep file:

    sweep:
      recipe: recipes/demo.yaml          # the base recipe (paths are relative to the current directory, as in recipes)
      name: demo-lr                      # runs/<name>/ (default: the file's stem)
      set: [student.sft.max_steps=300]   # applied to every variant
      grid: {student.sft.learning_rate: [0.001, 0.003]}   # one variant per combination
      variants: {no-verify: [filter.verify=false]}        # and named variants, each a list of overrides
      baseline: learning_rate-0.003      # the variant the paired differences are taken against (default: the first)

Each variant is a full recipe named after the variant, written to `runs/<sweep>/recipes/<variant>.yaml` and run
into `runs/<sweep>/<variant>/` exactly as `distill run` runs it (`distill.pipeline.run_stage`, stage by stage), so
`distill status runs/<sweep>/recipes/<variant>.yaml --runs-dir runs/<sweep>` works on it. Every variant is checked
(schema and `distill recipe check`) before anything runs, and every error is reported at once, led by its variant.
Variants have no `hub` section: a sweep compares; push the chosen one with `distill push` on its recipe.

Sharing: before a variant runs a stage, the sweep looks for a sibling whose finished output of that stage has the
same fingerprint (section hash and input hash, as the runner compares them). If one exists its folder is hard-linked
in (finished outputs are never written again, so links are safe) and the runner finds the stage cached. A stage's
manifest names the recipe that ran it, so the report reads "shared with <variant>" from the manifests alone. Under
`--parallel K` variants run in K processes, and a lock per fingerprint makes the first one to reach a shared stage
run it while the others wait for it and link it. A rerun of an interrupted sweep finds every finished stage cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill import files, pipeline, superseded
from distill.errors import DistillError, RecipeError
from distill.manifest import read_manifest
from distill.recipe import check_resources, dump_recipe, load_recipe, parse_yaml, read_yaml
from distill.schema import Recipe

log = logging.getLogger(__name__)
BRACKETS = "[]{}'\" "  # a list or quoted value names its variant without its brackets and quotes
UNSAFE = r"[^A-Za-z0-9._-]+"  # what a variant's folder name cannot hold
RESERVED = {"recipes", "logs", ".locks"}  # folders of runs/<sweep>/ that are not variants


class SweepSpec(BaseModel):
    """The `sweep:` section of a sweep file."""

    model_config = ConfigDict(extra="forbid")
    recipe: Path = Field(description="The base recipe YAML, relative to the current directory.")
    name: str | None = Field(None, description="The sweep's folder, runs/<name>/ (default: the sweep file's stem).")
    set: list[str] = Field(default_factory=list, description="Overrides applied to every variant (KEY=VALUE).")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Values per key; a variant per combination.")
    variants: dict[str, list[str]] = Field(default_factory=dict, description="Named variants: their overrides.")
    baseline: str | None = Field(None, description="Variant the paired differences are against (default: first).")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # this variant's own overrides (the sweep's common ones are in Sweep.common)
    recipe: Recipe


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    common: tuple[str, ...]
    variants: tuple[Variant, ...]
    baseline: str

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def split_values(text: str) -> list[str]:
    """`1e-3,3e-3` or `[1, 2],[3]`: commas split values except inside brackets, braces and quotes."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return [*values, current]


def parse_grid(options: list[str]) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2` options as {key: [override values as YAML text]}."""
    grid = {}
    for option in options:
        key, sep, raw = option.partition("=")
        if not sep or not key or not raw:
            raise RecipeError(f"--grid {option!r}: expected KEY=V1,V2,..., e.g. student.sft.learning_rate=1e-3,3e-3")
        grid[key] = split_values(raw)
    return grid


def grid_variants(grid: dict[str, list[str]]) -> dict[str, list[str]]:
    """One named variant per combination: `learning_rate-0.001_selection-all` (the full key where leaves clash)."""
    if not grid:
        return {}
    leaves = [key.rsplit(".", 1)[-1] for key in grid]
    labels = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, grid, strict=True)]
    out: dict[str, list[str]] = {}
    for combination in product(*grid.values()):
        pairs = zip(labels, combination, strict=True)
        name = "_".join(f"{label}-{re.sub(UNSAFE, '-', value.strip(BRACKETS))}" for label, value in pairs)
        if name in out:
            raise RecipeError(f"--grid: two combinations are both named {name!r}; give the values distinct names")
        out[name] = [f"{key}={value}" for key, value in zip(grid, combination, strict=True)]
    return out


def load_sweep(
    path: Path,
    *,
    grid: Sequence[str] = (),
    common: Sequence[str] = (),
    name: str | None = None,
    baseline: str | None = None,
) -> Sweep:
    """A sweep from a recipe plus `--grid` options, or from a sweep file (CLI options add to it). Every variant is
    loaded and checked; every problem of every variant is raised together, each line led by its variant."""
    data = read_yaml(path)
    if "sweep" in data:
        try:
            spec = SweepSpec.model_validate(data["sweep"])
        except ValidationError as exc:
            lines = (f"{path}: sweep.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RecipeError("\n".join(lines)) from None
        base = spec.recipe
        named = grid_variants({key: [_as_text(v) for v in values] for key, values in spec.grid.items()})
        clashes = named.keys() & spec.variants.keys()
        if clashes:
            raise RecipeError(f"{path}: sweep.variants: {sorted(clashes)} are also names of grid variants; rename")
        named.update(spec.variants)
        common = [*spec.set, *common]
        name, baseline = name or spec.name or path.stem, baseline or spec.baseline
    else:
        base, named = path, {}
        name = name or f"{path.stem}-sweep"
    named.update(grid_variants(parse_grid(list(grid))))
    if not named:
        raise RecipeError(f"{path}: no variants: give --grid KEY=V1,V2 or a sweep file with `grid:` or `variants:`")
    problems = [f"{path}: sweep name {name!r}: letters, digits, '.', '_' or '-'"] if not _valid(name) else []
    problems += [f"variant {v!r}: a reserved folder name; rename it" for v in named if v in RESERVED]
    problems += [f"variant {v!r}: letters, digits, '.', '_' or '-' only" for v in named if not _valid(v)]
    baseline = baseline or next(iter(named))
    if baseline not in named:
        problems.append(f"baseline {baseline!r}: not a variant (variants: {', '.join(named)})")
    variants = []
    for variant, overrides in named.items():
        try:
            recipe = load_recipe(base, overrides=[*common, *overrides])
            recipe = recipe.model_copy(update={"name": variant, "hub": None})
            found, notes = check_resources(recipe)
            problems += [f"variant {variant}: {line}" for line in found]
            for note in notes:
                log.info("variant %s: %s", variant, note)
            variants.append(Variant(variant, tuple(overrides), recipe))
        except RecipeError as exc:
            problems += [f"variant {variant}: {line}" for line in str(exc).splitlines()]
    if problems:
        raise RecipeError("\n".join(problems))
    return Sweep(name, Path(base), tuple(common), tuple(variants), baseline)


def _as_text(value: Any) -> str:
    """A sweep file's grid value as `--set` text: a plain string as it is when YAML reads it back unchanged."""
    if isinstance(value, str) and parse_yaml(value, where="sweep.grid") == value:
        return value
    return json.dumps(value)


def _valid(name: str | None) -> bool:
    return bool(name and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name))


def write_recipes(sweep: Sweep, sweep_dir: Path) -> dict[str, Path]:
    """Each variant's resolved recipe in runs/<sweep>/recipes/, for the workers, `distill status` and the record."""
    paths = {}
    for variant in sweep.variants:
        paths[variant.name] = sweep_dir / "recipes" / f"{variant.name}.yaml"
        changes = [*sweep.common, *variant.overrides]
        header = f"# variant {variant.name} of sweep {sweep.name}: {sweep.base} with {changes}\n"
        files.write_text(paths[variant.name], header + dump_recipe(variant.recipe))
    return paths


def run(sweep: Sweep, *, runs_dir: Path, options: pipeline.StageOptions, parallel: int = 1) -> dict[str, str]:
    """Run every variant (in order, or `parallel` at a time), sharing equal stages. Returns {variant: error} for
    those that failed; the others finish regardless."""
    sweep_dir = runs_dir / sweep.name
    paths = write_recipes(sweep, sweep_dir)
    names = [v.name for v in sweep.variants]
    failed = {}
    if parallel <= 1:
        for variant in sweep.variants:
            try:
                run_variant(variant.recipe, sweep_dir=sweep_dir, siblings=names, options=options)
            except DistillError as exc:
                log.error("variant %s failed: %s", variant.name, exc)
                failed[variant.name] = str(exc)
        return failed
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")  # vLLM and torch do not survive a fork
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # a new process per variant
    with ProcessPoolExecutor(max_workers=parallel, mp_context=spawn, **fresh) as pool:
        jobs = {
            name: pool.submit(_worker, str(paths[name]), str(sweep_dir), names, options, log.getEffectiveLevel())
            for name in names
        }
        for name, job in jobs.items():
            error = job.result()
            if error:
                log.error("variant %s failed (log: %s): %s", name, sweep_dir / "logs" / f"{name}.log", error)
                failed[name] = error
    return failed


def _worker(recipe_path: str, sweep_dir: str, siblings: list[str], options: Any, level: int) -> str | None:
    """One variant in its own process, its log in runs/<sweep>/logs/<variant>.log; returns its error, if any."""
    recipe = load_recipe(recipe_path)
    log_file = Path(sweep_dir) / "logs" / f"{recipe.name}.log"
    with log_file.open("a", encoding="utf-8") as sink:  # what the libraries print, too (vLLM, TRL)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    try:
        run_variant(recipe, sweep_dir=Path(sweep_dir), siblings=siblings, options=options)
    except Exception as exc:  # a failed variant must not take the others down: report it, by name
        logging.getLogger(__name__).error("%s", traceback.format_exc())
        return f"{type(exc).__name__}: {exc}" if not isinstance(exc, DistillError) else str(exc)
    return None


def run_variant(recipe: Recipe, *, sweep_dir: Path, siblings: list[str], options: pipeline.StageOptions) -> None:
    """`distill run` for one variant, linking in each stage a sibling already finished with the same fingerprint."""
    for stage in pipeline.STAGES.values():
        if not pipeline.configured(recipe, stage):
            continue
        sections = pipeline.section_hash(recipe, stage, options)
        inputs, _ = pipeline.input_hash(recipe, stage, sweep_dir / recipe.name, options)
        with _locked(sweep_dir, superseded.fingerprint(sections, inputs)):
            link_shared(recipe, stage.name, sweep_dir=sweep_dir, siblings=siblings, fingerprint=(sections, inputs))
            pipeline.run_stage(recipe, stage.name, runs_dir=sweep_dir, options=options)


def link_shared(
    recipe: Recipe, stage: str, *, sweep_dir: Path, siblings: list[str], fingerprint: tuple[str, str]
) -> str | None:
    """Hard-link a sibling's finished `stage` with this fingerprint into the variant's run, unless its own output
    already has it. Returns the sibling linked from."""
    run_dir = sweep_dir / recipe.name
    own = read_manifest(run_dir / stage)
    if own is not None and (own.section_hash, own.input_hash) == fingerprint:
        return None
    for sibling in siblings:
        source = sweep_dir / sibling / stage
        manifest = read_manifest(source) if sibling != recipe.name else None
        if manifest is None or (manifest.section_hash, manifest.input_hash) != fingerprint:
            continue
        work = run_dir / pipeline.WORK / f"{stage}-{superseded.fingerprint(*fingerprint)}-shared"
        if work.exists():
            shutil.rmtree(work)  # a link tree a kill interrupted
        work.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, work, copy_function=_link)
        superseded.swap_in(run_dir, work, run_dir / stage)
        log.info("%s/%s: shared with %s (same section and input hashes)", recipe.name, stage, sibling)
        return sibling
    return None


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copy2(source, target)


@contextlib.contextmanager
def _locked(sweep_dir: Path, key: str) -> Iterator[None]:
    """One process at a time per stage fingerprint: the first runs it, the others then link its output."""
    folder = sweep_dir / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
