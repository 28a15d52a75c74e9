"""`distill` command line: one recipe drives every stage.

    distill run recipes/demo.yaml                 # every configured stage, skipping finished ones
    distill generate recipes/x.yaml --shard 3/8   # one stage (here: one of 8 parallel teacher jobs)
    distill status recipes/x.yaml                 # done / stale / missing per stage
    distill sweep recipes/x.yaml --grid student.sft.learning_rate=1e-5,3e-5   # variants, compared in one report
    distill gc recipes/x.yaml --remove --keep 1   # delete superseded outputs but the newest per stage
    distill recipe show recipes/x.yaml --set student.sft.learning_rate=1e-5

Bad input ends with one message naming the file, key or record, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from distill import __version__
from distill.errors import DistillError

log = logging.getLogger("distill")
STAGE_HELP = {
    "generate": "teacher: chain-of-thought traces for the recipe's problems (vLLM or an OpenAI-compatible endpoint)",
    "filter": "verify, clean, deduplicate and decontaminate the traces",
    "train": "fine-tune the student on the kept traces (TRL SFT, LoRA or full)",
    "onpolicy": "distil the trained student on its own samples, scored token by token by the teacher (reverse KL)",
    "eval": "score a model: pass@1 over k samples, pass@k, maj@k",
    "push": "push the dataset and the student to the Hugging Face Hub with lineage cards",
}


def _shard(text: str) -> tuple[int, int]:
    index, sep, total = text.partition("/")
    if not (sep and index.isdigit() and total.isdigit() and 0 <= int(index) < int(total)):
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N, e.g. 3/8; got {text!r}")
    return int(index), int(total)


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set student.sft.learning_rate=1e-5 (repeatable)",
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories live (runs/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a TTY)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (per-record detail)")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts such as 64,128,256, got {text!r}") from None
    if not budgets:
        raise argparse.ArgumentTypeError("expected at least one token count, e.g. 64,128,256")
    return budgets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGE_HELP.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        _recipe_args(stage)
        stage.add_argument("--force", action="store_true", help="re-run even if the manifest matches")
        if name == "generate":
            stage.add_argument(
                "--shard",
                type=_shard,
                default=(0, 1),
                metavar="i/N",
                help="run only shard i of N (deterministic split of problem ids)",
            )
        if name == "eval":
            stage.add_argument("--model", help="evaluate this model instead of the train stage's output")
            stage.add_argument(
                "--repeat", type=int, metavar="R", help="score R times, engine seeds seed, seed+1, ... (eval.repeat)"
            )
            stage.add_argument(
                "--budgets",
                type=_budgets,
                metavar="B1,B2,...",
                help="also score at most B thinking tokens per sample, for each B (eval.thinking_budgets)",
            )
        if name == "push":
            stage.add_argument("--dry-run", action="store_true", help="stage the repo folders, send nothing")
    run = sub.add_parser("run", help="run every configured stage in order, skipping finished ones")
    _recipe_args(run)
    run.add_argument(
        "--force",
        action="append",
        default=[],
        choices=list(STAGE_HELP),
        metavar="STAGE",
        help="re-run this stage even if its manifest matches (repeatable)",
    )
    run.add_argument("--dry-run", action="store_true", help="push stage: stage the repo folders, send nothing")
    sweep = sub.add_parser("sweep", help="run recipe variants through the stage cache; one report comparing them")
    _recipe_args(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a variant per value (per combination, with several --grid), e.g. student.sft.learning_rate=1e-3,3e-3",
    )
    sweep.add_argument("--name", help="the sweep's folder runs/<NAME>/ (default: from the file's name)")
    sweep.add_argument("--baseline", help="the variant paired differences are taken against (default: the first)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="K", help="run K variants at once (default 1)")
    sweep.add_argument("--report-only", action="store_true", help="rewrite the report; run nothing")
    _recipe_args(sub.add_parser("status", help="table of stages: done / stale / missing, counts, when"))
    gc = sub.add_parser("gc", help="list the outputs re-runs moved aside (runs/<name>/.superseded); --remove them")
    _recipe_args(gc)
    gc.add_argument("--remove", action="store_true", help="delete them (all, or all but the newest --keep)")
    gc.add_argument("--keep", type=_count, metavar="N", help="with --remove: keep the newest N per stage")
    recipe = sub.add_parser("recipe", help="show, check or document recipes")
    recipe_sub = recipe.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    _recipe_args(recipe_sub.add_parser("show", help="print the fully resolved recipe"))
    check = recipe_sub.add_parser("check", help="validate recipes (every error at once)")
    check.add_argument("recipes", nargs="+", type=Path)
    plan = recipe_sub.add_parser("plan", help="print the scale a recipe asks for: tokens, cost, steps, GPU memory")
    _recipe_args(plan)
    plan.add_argument("--gpus", type=int, help="GPUs the student trains on (default: NNODES x NPROC_PER_NODE, else 1)")
    plan.add_argument("--json", action="store_true", help="print the figures as JSON")
    reference = recipe_sub.add_parser("reference", help="print the recipe reference (Markdown) from the schema")
    reference.add_argument("--readme", type=Path, help="rewrite the reference section of this README instead")
    verify = sub.add_parser("verify", help="verify any trace file; writes every row back with a verdict")
    verify.add_argument("input", type=Path, help="JSONL file of traces")
    verify.add_argument("--answer-field", required=True, help="field holding the reference answer")
    verify.add_argument("--response-field", required=True, help="field holding the model's full response")
    verify.add_argument("--kind", choices=["math", "choice", "code"], default="math")
    verify.add_argument("--output", type=Path, required=True, help="JSONL to write (atomically)")
    verify.add_argument("--timeout", type=float, default=5.0, help="seconds per answer check")
    verify.add_argument(
        "--sandbox", choices=["bwrap", "unshare", "rlimits"], default="bwrap", help="isolation for --kind code"
    )
    verify.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    verify.add_argument("--no-progress", action="store_true")
    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model (safetensors)")
    merge.add_argument("adapter", type=Path, help="folder with adapter_config.json")
    merge.add_argument("out", type=Path, help="folder for the merged model")
    merge.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    demo = sub.add_parser("demo", help="the offline demo: prepare its teacher, run the ablation, write the report")
    demo.add_argument(
        "action",
        choices=["prepare", "ablate", "run"],
        help="prepare: problems + tiny teacher/student; ablate: the distill run and the comparison runs, then "
        "runs/<name>/report.md; run: prepare, then ablate",
    )
    _recipe_args(demo)
    for flag, help_text in (
        ("--problems", "distillation problems to write"),
        ("--heldout", "held-out problems to write"),
        ("--teacher-problems", "gold-trace problems the teacher trains on"),
        ("--teacher-steps", "SFT steps of the teacher"),
        ("--seed", "seed of the problem splits and models"),
    ):
        demo.add_argument(flag, type=int, help=f"{help_text} (default: distill.demo.prepare.Settings)")
    tiny = sub.add_parser("tiny-model", help="write a small random-init causal LM with a locally trained tokenizer")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=2, help="attention heads; head_dim = hidden/heads must be >= 32")
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--corpus", type=Path, help="text file to train the tokenizer on (default: built-in math text)")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _cpu_defaults() -> None:
    """On machines without an NVIDIA driver, run vLLM's engine in-process (ready in seconds instead of ~40 s) and
    bind its messaging to loopback (multiprocess mode otherwise picks a non-loopback address). Settings in the
    environment win."""
    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cpu_defaults()
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _dispatch(args)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from distill import commands

    handler = {
        "run": commands.run,
        "status": commands.status,
        "sweep": commands.sweep,
        "gc": commands.gc,
        "recipe": commands.recipe,
        "tiny-model": commands.tiny_model,
        "verify": commands.verify,
        "merge": commands.merge,
        "demo": commands.demo,
    }.get(args.command, commands.stage)
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
