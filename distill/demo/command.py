"""`distill demo prepare|ablate|run RECIPE`: what `make demo` calls.

    distill demo prepare recipes/demo.yaml      # problems, tiny student, tiny teacher (cached by their settings)
    distill run recipes/demo.yaml --dry-run     # generate → filter → train → eval → push (dry run)
    distill demo ablate recipes/demo.yaml       # the comparison runs (distill.demo.ablation), then report.md

`ablate` finishes the distill run first (its stages are cached when `distill run` made them), starting the
teacher's evaluation beside generation and the other comparison runs as soon as the traces are filtered, so they
overlap its training and evaluation (two cores: they are separate processes). `run` is `prepare` then `ablate`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from distill import files, pipeline
from distill.demo import ablation
from distill.demo.prepare import STAMP, Settings, prepare
from distill.errors import DistillError
from distill.schema import Recipe

log = logging.getLogger(__name__)
# vLLM on CPU: the in-process engine starts in seconds instead of 30-40 s and its messaging stays on loopback; one
# OpenMP thread per process, because the demo runs two processes on two cores. Values already set are kept.
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "OMP_NUM_THREADS": "1"}


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings with the command-line values that were given; the rest keep their defaults."""
    fields = dataclasses.fields(Settings)
    given = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name, None) is not None}
    return dataclasses.replace(Settings(), **given)


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Torch on every core while nothing else runs: the teacher's SFT in `prepare` (99 s on one thread, 69 s on
    two, measured on a 2-core machine). The stages after it run side by side, one thread each."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(args: argparse.Namespace, *, recipe: Recipe, options: pipeline.StageOptions) -> int:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the ablation runs on a kill too
    started = time.monotonic()
    runs_dir = args.runs_dir
    if args.action in ("prepare", "run"):
        with every_core():
            prepare(recipe, settings=settings_from(args), progress=options.progress)
    if args.action == "prepare":
        return 0
    stamp = Path(recipe.teacher.model if recipe.teacher else ".") / STAMP
    if not stamp.is_file():
        raise DistillError(f"demo: {stamp} not found; run `distill demo prepare {args.recipe}` first")
    # Every stage sees the same options (`--dry-run` is part of each stage's fingerprint), as in `distill run
    # --dry-run`, so this command and that one reuse each other's finished stages.
    options = dataclasses.replace(options, dry_run=True)
    processes = [ablation.start_teacher(recipe, runs_dir=runs_dir)]
    try:
        for stage in ("generate", "filter"):  # what the other ablation runs need; cached when `distill run` made them
            pipeline.run_stage(recipe, stage, runs_dir=runs_dir, options=options)
        derived, variant_runs = ablation.start(recipe, runs_dir=runs_dir)
        processes += variant_runs
        pipeline.run_all(recipe, runs_dir=runs_dir, options=options)
        ablation.wait(processes)
    finally:
        ablation.stop(processes)
    from distill.demo.report import write_report

    path = write_report(
        recipe, derived, runs_dir=runs_dir, prepared=files.read_json(stamp), elapsed_s=time.monotonic() - started
    )
    print(path.read_text(encoding="utf-8"))
    return 0
