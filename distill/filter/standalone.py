"""`distill verify`: check any trace file (yours or a published one) with the filter's own verifier.

    distill verify traces.jsonl --answer-field answer --response-field generation --output verdicts.jsonl

Every input row is written back, in order, with `"verdict": {"correct": bool, "reason": str}` added; `reason` is
one of the filter stage's reasons (`ok` when correct), computed by the same steps in the same worker pool. A
response that opens `<think>` and never closes it, or a row with `finish_reason: length`, is `truncated`; a
response without think tags is all final answer. For `--kind code` the answer field holds the tests
([{input, output}] or {inputs: [...], outputs: [...]}, JSON text accepted).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from distill import files
from distill.data import parse_tests
from distill.errors import DataError
from distill.filter.pool import VerifyPool
from distill.filter.progress import records_progress
from distill.filter.steps import AnswerMatches, Truncated
from distill.records import THINK_CLOSE, THINK_OPEN, split_reasoning

log = logging.getLogger(__name__)
BATCH = 16  # rows per worker task (rows of a published file are independent problems)


def published_item(
    row: dict[str, Any], *, kind: str, answer_field: str, response_field: str, where: str
) -> dict[str, Any]:
    """The worker item for one row; a missing field is an error naming the row."""
    for name in (answer_field, response_field):
        if name not in row:
            raise DataError(f"{where}: no field {name!r} (fields: {', '.join(sorted(row))})")
    response = row[response_field]
    if not isinstance(response, str):
        raise DataError(f"{where}: field {response_field!r} must be a string, got {type(response).__name__}")
    reasoning, final = split_reasoning(response)
    has_close = THINK_CLOSE in response or THINK_OPEN not in response
    answer = row[answer_field]
    tests = parse_tests(answer) if kind == "code" else None
    return {
        "kind": kind,
        "answer": None if kind == "code" or answer is None else str(answer),
        "tests": tests,
        "choices": None,
        "problem": "",
        "reasoning": reasoning,
        "final": final,
        "has_close": has_close,
        "finish_reason": str(row.get("finish_reason") or "stop"),
    }


def _batches(args: argparse.Namespace, rows: list[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
    """Worker tasks of BATCH rows; the rows themselves wait in `rows` until their verdicts come back, in order."""
    batch: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for number, row in enumerate(files.read_jsonl(args.input), start=1):
        where = f"{args.input} record {number}"
        items.append(
            published_item(
                row, kind=args.kind, answer_field=args.answer_field, response_field=args.response_field, where=where
            )
        )
        batch.append(row)
        if len(batch) == BATCH:
            rows.append(batch)
            yield items
            batch, items = [], []
    if batch:
        rows.append(batch)
        yield items


def main(args: argparse.Namespace) -> int:
    steps = [Truncated(), AnswerMatches(verify=True, timeout_s=args.timeout, sandbox=args.sandbox)]
    workers = args.workers or os.cpu_count() or 1
    reasons: Counter[str] = Counter()
    pending: list[list[dict[str, Any]]] = []

    def verdicts(pool: VerifyPool, advance: Any) -> Iterator[dict[str, Any]]:
        for outcomes in pool.imap(_batches(args, pending)):
            for row, (_, reason) in zip(pending.pop(0), outcomes, strict=True):
                reasons[reason] += 1
                yield {**row, "verdict": {"correct": reason == "ok", "reason": reason}}
            advance(len(outcomes))

    progress = not args.no_progress and os.isatty(2)
    with (
        VerifyPool(steps=steps, workers=workers, timeout_s=args.timeout) as pool,
        records_progress("verify", enabled=progress) as advance,
    ):
        written = files.write_jsonl(args.output, verdicts(pool, advance))
    log.info("verify: %d rows → %s; %s", written, args.output, dict(sorted(reasons.items())))
    return 0
