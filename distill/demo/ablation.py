"""The report's comparison rows: each one is `distill run` on a recipe derived from the demo's, written to a file.

| row                       | recipe file (runs/<name>/ablation/) | differs from the distill run                      |
|---------------------------|-------------------------------------|---------------------------------------------------|
| untrained                 | (the distill run)                   | `eval.compare_base` scores `student.model` itself |
| SFT on answers only       | `<name>-answers.yaml`               | train rows: the kept traces, reasoning removed    |
| SFT on all traces         | `<name>-unfiltered.yaml`            | `filter`: no verification, no format checks       |
| SFT on filtered traces    | (the recipe as written)             |                                                   |
| teacher                   | `<name>-teacher.yaml`               | `eval.model`: the teacher (eval stage only), with |
|                           |                                     | the recipe's thinking-budget curve                |
| SFT on few traces         | `<name>-few.yaml`                   | train rows: the kept traces of the first problems |
| few, then on-policy       | `<name>-few.yaml`                   | + `onpolicy` (`distill.demo.budget.ONPOLICY`)     |
| SFT at the same budget    | `<name>-more.yaml`                  | the few student, SFT-continued as many steps on   |
|                           |                                     | the first K problems' kept traces                 |

The last three rows compare the teacher's budget (`distill.demo.budget`): `eval.compare_sft` scores the `few`
student before and after its on-policy steps.

Every trained row uses the same `student` and `eval` sections, on the same held-out problems. The variants share
the distill run's teacher traces: its finished `generate` stage is copied into their run directories, and the
runner accepts the copy only because its manifest matches their recipe (same `data` and `teacher` sections, same
problems), so nothing is generated twice and nothing is trusted unchecked.
The variant runs are separate `distill run` processes (logs beside their recipe files), started together with the
distill run's training, so both cores stay busy; every stage is cached like any run's, so a rerun takes seconds.
The teacher's evaluation starts first, beside the generation of the traces (`start_teacher`). The answers row is
short and leads to nothing else, so it runs at a lower priority (`FILLER_NICENESS`): the long chains (the full-length
trainings, the `few` student's on-policy and `more` rows) get the cores first, and the filler uses what they leave.
Each process is single-threaded and seeded, so the schedule changes when rows finish, never what they compute.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill import files, pipeline
from distill.demo import budget
from distill.errors import DistillError
from distill.manifest import Manifest, read_manifest, write_manifest
from distill.recipe import dump_recipe
from distill.records import THINK_CLOSE, THINK_OPEN
from distill.schema import Recipe

log = logging.getLogger(__name__)
# `nice` of the filler job (the answers row): at 10 the kernel gives it about a tenth of a core while the long
# chains run, and every idle cycle after (measured in the demo report's wall time).
FILLER_NICENESS = 10
UNFILTERED = {  # every filter step that can be switched off is
    "verify": False,
    "truncated": False,
    "no_answer": False,
    "empty_reasoning": False,
    "max_cjk_ratio": None,
    "max_repeated_ngram_ratio": None,
    "code_in_reasoning": False,
    "pass_rate": None,
    "max_per_problem": None,
}


def variants(recipe: Recipe, *, runs_dir: Path = Path("runs")) -> dict[str, Recipe]:
    """The derived recipes, by row key. Only the keys named in the module table change."""
    if recipe.eval is None or recipe.student is None or recipe.teacher is None:
        raise DistillError(f"demo: recipe {recipe.name} needs teacher, student and eval sections")
    base = recipe.model_dump(mode="json")
    scored = {**base["eval"], "compare_base": False, "thinking_budgets": []}  # the curve: distill run and teacher
    steps = budget.onpolicy_steps(int(recipe.student.sft.get("max_steps") or 1))
    onpolicy = {"config": {**budget.ONPOLICY, "max_steps": steps}}
    return {
        "answers": _derive(base, name=f"{recipe.name}-answers", hub=None, eval=scored),
        "unfiltered": _derive(
            base, name=f"{recipe.name}-unfiltered", hub=None, eval=scored, filter={**base["filter"], **UNFILTERED}
        ),
        "teacher": _derive(
            base,
            name=f"{recipe.name}-teacher",
            hub=None,
            eval={**scored, "model": recipe.teacher.model, "thinking_budgets": base["eval"]["thinking_budgets"]},
        ),
        "few": _derive(
            base,
            name=f"{recipe.name}-few",
            hub=None,
            eval={**scored, "compare_sft": True},
            onpolicy=onpolicy,
        ),
        "more": _derive(  # the `few` student, SFT-continued as long as the on-policy row, at its learning rate
            base,
            name=f"{recipe.name}-more",
            hub=None,
            eval=scored,
            student={
                **base["student"],
                "model": str(runs_dir / f"{recipe.name}-few" / "train"),
                "sft": {**base["student"]["sft"], **budget.CONTINUED, "max_steps": steps},
            },
        ),
    }


def write_recipes(recipe: Recipe, *, runs_dir: Path) -> tuple[dict[str, Recipe], dict[str, Path]]:
    """The derived recipes, written beside the distill run (`runs/<name>/ablation/<variant>.yaml`), and their paths."""
    derived = variants(recipe, runs_dir=runs_dir)
    folder = runs_dir / recipe.name / "ablation"
    paths = {key: folder / f"{variant.name}.yaml" for key, variant in derived.items()}
    for key, variant in derived.items():
        files.write_text(
            paths[key], f"# derived by `distill demo` from {recipe.name}: the {key} row\n" + dump_recipe(variant)
        )
    return derived, paths


def start_teacher(recipe: Recipe, *, runs_dir: Path) -> subprocess.Popen:
    """Start the teacher's evaluation, which needs only the prepared teacher and the held-out problems: it runs
    while the traces are generated, on the core that generation (one thread here) leaves idle."""
    derived, paths = write_recipes(recipe, runs_dir=runs_dir)
    job = [[*CLI, "eval", str(paths["teacher"]), *_common(runs_dir)]]
    return _spawn(job, log_path=runs_dir / recipe.name / "ablation" / f"{derived['teacher'].name}.log", nice=0)


def start(recipe: Recipe, *, runs_dir: Path) -> tuple[dict[str, Recipe], list[subprocess.Popen]]:
    """Give the variant recipes the distill run's traces and start their runs in the background (the teacher's
    row is `start_teacher`'s). Needs the distill run's generate and filter stages finished. Returns the variants
    and their processes."""
    derived, paths = write_recipes(recipe, runs_dir=runs_dir)
    main_dir = runs_dir / recipe.name
    for key in ("answers", "unfiltered", "few", "more"):
        seed_stage(main_dir / "generate", runs_dir / derived[key].name / "generate")
    source = main_dir / "filter"
    kept = list(files.read_jsonl(source / "kept.jsonl"))
    write_derived_filter(
        derived["answers"],
        source=source,
        runs_dir=runs_dir,
        transform="answers_only",
        rows=[answers_only(row) for row in kept],
    )
    steps = derived["few"].onpolicy.config["max_steps"]
    spend = budget.plan(main_dir / "generate", kept, steps=steps)
    for key, ids in (("few", spend.few), ("more", spend.more)):
        chosen = set(ids)
        write_derived_filter(
            derived[key],
            source=source,
            runs_dir=runs_dir,
            transform=f"first_{len(ids)}_problems",
            rows=[row for row in kept if row["id"] in chosen],
            extra={
                "problems": len(ids),
                "teacher_generated_tokens": spend.tokens(ids),
                "expected_scored_tokens": spend.expected_scored,
            },
        )
    # `--dry-run` is in push's fingerprint only (`StageOptions.fingerprint`); the variants have no `hub` section, so
    # it changes nothing for them: it is passed to `distill run` as the distill run passes it, and `train` has none.
    run = [*CLI, "run", "--dry-run", *_common(runs_dir)]
    jobs = {  # name: (commands, niceness)
        "unfiltered": ([[*run, str(paths["unfiltered"])]], 0),
        "few": (  # `more` continues the `few` student: once it is trained, both go on side by side
            [
                [*CLI, "train", str(paths["few"]), *_common(runs_dir)],
                [[*run, str(paths["more"])], [*run, str(paths["few"])]],
            ],
            0,
        ),
        "answers": ([[*run, str(paths["answers"])]], FILLER_NICENESS),
    }
    folder = main_dir / "ablation"
    processes = [
        _spawn(job, log_path=folder / f"{derived[key].name}.log", nice=nice) for key, (job, nice) in jobs.items()
    ]
    return derived, processes


CLI = [sys.executable, "-m", "distill.cli"]


def _common(runs_dir: Path) -> list[str]:
    return ["--runs-dir", str(runs_dir), "--no-progress"]


def _spawn(job: list[Any], *, log_path: Path, nice: int) -> subprocess.Popen:
    """Run `job`'s commands one after another (an item that is a list of commands runs them side by side) in a
    shell in the background, output to `log_path`."""
    script = " && ".join(_shell(command) for command in job)
    log.info("demo: started %s (log: %s)", script, log_path)
    with log_path.open("w", encoding="utf-8") as handle:
        return subprocess.Popen(
            script,
            shell=True,
            stdout=handle,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _own_group_at(nice),
        )


def _own_group_at(nice: int) -> None:
    """In the child before it runs: its own process group (so `stop` ends all it started), in this session, at
    `nice`. Not a new session: where the kernel groups scheduling by session (autogroup), niceness would then only
    rank the processes inside it, not the runs against each other."""
    os.setpgid(0, 0)
    os.nice(nice)


def _shell(command: list[Any]) -> str:
    """One command, or a list of commands run side by side that succeeds only when every one of them does."""
    if not command or isinstance(command[0], str):
        return subprocess.list2cmdline(command)
    started = " ".join(f"{subprocess.list2cmdline(c)} & p{i}=$!;" for i, c in enumerate(command))
    return "{ " + started + " " + " && ".join(f"wait $p{i}" for i in range(len(command))) + "; }"


def wait(processes: list[subprocess.Popen]) -> None:
    """Wait for every variant run; a failed one is an error that names its command (its log is beside its recipe)."""
    failed = [p.args for p in processes if p.wait() != 0]
    if failed:
        raise DistillError(f"demo: {len(failed)} ablation run(s) failed: {failed}; see runs/<name>/ablation/*.log")


def stop(processes: list[subprocess.Popen]) -> None:
    """Stop variant runs still going (their whole process group: the shell and the `distill` it runs)."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()


def seed_stage(source: Path, target: Path) -> None:
    """Copy a finished stage directory unless `target` already holds the same output (by manifest hash)."""
    manifest = read_manifest(source)
    if manifest is None:
        raise DistillError(f"{source}: not a finished stage (no manifest.json)")
    present = read_manifest(target)
    if present is not None and present.output_hash == manifest.output_hash:
        return
    tmp = target.with_name(f".{target.name}{files.TMP_MARK}{os.getpid()}")
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def answers_only(row: dict[str, Any]) -> dict[str, Any]:
    """A kept trace as an answers-only training row: same prompt and final answer, an empty `<think>` block."""
    answer = {"role": "assistant", "content": f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{row['final']}"}
    return {**row, "reasoning": "", "messages": [*row["messages"][:-1], answer]}


def write_derived_filter(
    recipe: Recipe,
    *,
    source: Path,
    runs_dir: Path,
    transform: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """A variant's filter stage made from the distill run's kept traces (`rows`: a subset, or the same rows
    transformed), so the only difference from the distill student is that one. It gets a manifest like any stage
    (recorded as derived from `source`), so the variant's train stage reads it through the runner."""
    source_manifest = read_manifest(source)
    if source_manifest is None:
        raise DistillError(f"{source}: the distill run's filter stage has not finished")
    out = runs_dir / recipe.name / "filter"
    stage, options = pipeline.STAGES["filter"], pipeline.StageOptions(dry_run=True)  # as its `distill run --dry-run`
    sections = pipeline.section_hash(recipe, stage, options)
    inputs_hash, _ = pipeline.input_hash(recipe, stage, runs_dir / recipe.name, options)
    present = read_manifest(out)
    key = (sections, inputs_hash, source_manifest.output_hash, transform)
    if (
        present
        and (
            present.section_hash,
            present.input_hash,
            present.extra.get("derived_from_output"),
            present.extra.get("transform"),
        )
        == key
    ):
        return present
    work = out.with_name(f".{out.name}{files.TMP_MARK}{os.getpid()}")
    work.mkdir(parents=True)
    n = files.write_jsonl(work / "kept.jsonl", rows)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(
        stage="filter",
        recipe=recipe.name,
        section_hash=sections,
        input_hash=inputs_hash,
        output_hash=files.sha256_tree(work),
        counts={"in": n, "out": n, "dropped": {}},
        started_at=now,
        finished_at=now,
        wall_s=0.0,
        extra={
            "derived_from": str(source),
            "derived_from_output": source_manifest.output_hash,
            "transform": transform,
            **(extra or {}),
        },
    )
    write_manifest(work, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return manifest


def _derive(base: dict[str, Any], **changes: Any) -> Recipe:
    return Recipe.model_validate({**base, **changes})
