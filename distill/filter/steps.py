"""Filter steps (datatrove style) and the one funnel that counts them.

A step is a small class: `name` (its class name in snake_case), a declared `reasons` tuple, and
`check(record) -> reason | None`. The per-trace steps here run inside the verification workers on a trace *item*:
the `Trace` fields they need (`kind`, `answer`, `choices`, `tests`, `problem`, `reasoning`, `final`,
`finish_reason`) plus `has_close` (whether `</think>` was emitted). Problem-level steps (dedup, decontamination) and
selection live in `distill.filter.problems` and `distill.filter.selection`; all of them are counted by `Funnel`.

Order matters and is fixed: truncated first, before any answer extraction (R1: a sample cut by max_tokens is
never scored; `distill.records.CUT_SHORT` lists every finish reason that means cut short), and the answer check
last, so expensive verification only sees traces worth keeping.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from distill.filter import answers
from distill.records import CUT_SHORT, THINK_CLOSE, THINK_OPEN

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
REPEAT_N = 10  # word n-gram length for the repetition ratio (long enough that ordinary phrasing rarely repeats)


class Step:
    """Base: `setup` runs once per worker process before any record (e.g. loading a tokenizer); `prepare` runs in
    the stage's own process the first time a kind of record is sent to the workers (e.g. checking the sandbox)."""

    name: str = ""
    reasons: tuple[str, ...] = ()

    def setup(self) -> None:
        return None

    def prepare(self, kind: str) -> None:
        return None

    def check(self, record: dict[str, Any]) -> str | None:
        raise NotImplementedError(f"{type(self).__name__}.check")


def assistant_text(record: dict[str, Any]) -> str:
    """The assistant turn the student trains on: R1's `<think>` layout around the reasoning, then the final text."""
    return f"{THINK_OPEN}\n{record['reasoning']}\n{THINK_CLOSE}\n\n{record['final']}"


def cjk_share(text: str) -> float:
    letters = sum(1 for ch in text if not ch.isspace())
    return len(_CJK.findall(text)) / letters if letters else 0.0


def repeated_ngram_share(text: str, n: int = REPEAT_N) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    words = text.split()
    total = len(words) - n + 1
    if total <= n:
        return 0.0
    return 1 - len(set(zip(*(words[i:] for i in range(n)), strict=False))) / total


class Truncated(Step):
    name, reasons = "truncated", ("truncated",)

    def check(self, record: dict[str, Any]) -> str | None:
        return "truncated" if record["finish_reason"] in CUT_SHORT or not record["has_close"] else None


class EmptyReasoning(Step):
    name, reasons = "empty_reasoning", ("empty_reasoning",)

    def check(self, record: dict[str, Any]) -> str | None:
        return None if record["reasoning"].strip() else "empty_reasoning"


class NoAnswer(Step):
    name, reasons = "no_answer", ("no_answer",)

    def check(self, record: dict[str, Any]) -> str | None:
        n_choices = len(record.get("choices") or []) or 26
        return None if answers.has_answer(record["kind"], record["final"], n_choices=n_choices) else "no_answer"


class TooLong(Step):
    """Counts tokens with the *student's* tokenizer: that is the length the student will train on."""

    name, reasons = "too_long", ("too_long",)

    def __init__(self, *, model: str, max_tokens: int) -> None:
        self.model, self.max_tokens = model, max_tokens
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # each worker loads its own

    def setup(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model)

    def check(self, record: dict[str, Any]) -> str | None:
        if self._tokenizer is None:
            self.setup()
        ids = self._tokenizer(assistant_text(record), add_special_tokens=False)["input_ids"]
        return "too_long" if len(ids) > self.max_tokens else None


class LanguageMixing(Step):
    """R1's language-consistency concern: CJK text inside the reasoning of a problem that is not itself CJK."""

    name, reasons = "language_mixing", ("language_mixing",)

    def __init__(self, *, max_ratio: float) -> None:
        self.max_ratio = max_ratio

    def check(self, record: dict[str, Any]) -> str | None:
        if cjk_share(record["problem"]) > self.max_ratio:
            return None
        return "language_mixing" if cjk_share(record["reasoning"]) > self.max_ratio else None


class Repetition(Step):
    name, reasons = "repetition", ("repetition",)

    def __init__(self, *, max_ratio: float) -> None:
        self.max_ratio = max_ratio

    def check(self, record: dict[str, Any]) -> str | None:
        return "repetition" if repeated_ngram_share(record["reasoning"]) > self.max_ratio else None


class CodeInReasoning(Step):
    """R1 removed reasoning with code blocks for math and choice data; code problems are meant to contain code."""

    name, reasons = "code_in_reasoning", ("code_in_reasoning",)

    def check(self, record: dict[str, Any]) -> str | None:
        return "code_in_reasoning" if record["kind"] in ("math", "choice") and "```" in record["reasoning"] else None


class AnswerMatches(Step):
    """The verifier, always the last per-trace step. Kind `none` (or `verify: false`) passes as `unverified`."""

    name, reasons = "answer_matches", answers.ANSWER_REASONS + answers.CODE_REASONS

    def __init__(self, *, verify: bool, timeout_s: float, sandbox: str) -> None:
        self.verify, self.timeout_s, self.sandbox = verify, timeout_s, sandbox
        self.isolation: str | None = None  # the sandbox code ran under, once a code trace was sent

    def setup(self) -> None:
        if self.verify:
            answers.warm_up()

    def prepare(self, kind: str) -> None:
        """Before the first code trace runs: the recipe's sandbox must work here (else one clear error)."""
        if self.verify and kind == "code":
            from distill.filter.isolation import require

            self.isolation = require(self.sandbox)  # type: ignore[arg-type]

    def check(self, record: dict[str, Any]) -> str | None:
        if not self.verify or record["kind"] == "none":
            return None
        try:
            reason = answers.check(record, timeout_s=self.timeout_s, sandbox=self.sandbox)
        except Exception:  # sympy can raise anything; counted, never a silent wrong answer
            reason = "verify_error"
        return None if reason == "ok" else reason

    def verdict(self, record: dict[str, Any]) -> str:
        return "unverified" if not self.verify or record["kind"] == "none" else "ok"


def trace_steps(config: Any, *, student_model: str) -> list[Step]:
    """The per-trace steps a `Filter` recipe section switches on, in their fixed order (answer check last).
    `student_model` is the tokenizer `max_tokens` counts with (the recipe schema requires it with `max_tokens`)."""
    steps: list[Step] = []
    if config.truncated:
        steps.append(Truncated())
    if config.empty_reasoning:
        steps.append(EmptyReasoning())
    if config.no_answer:
        steps.append(NoAnswer())
    if config.max_tokens is not None:
        steps.append(TooLong(model=student_model, max_tokens=config.max_tokens))
    if config.max_cjk_ratio is not None:
        steps.append(LanguageMixing(max_ratio=config.max_cjk_ratio))
    if config.max_repeated_ngram_ratio is not None:
        steps.append(Repetition(max_ratio=config.max_repeated_ngram_ratio))
    if config.code_in_reasoning:
        steps.append(CodeInReasoning())
    return [*steps, AnswerMatches(verify=config.verify, timeout_s=config.verify_timeout_s, sandbox=config.sandbox)]


class Funnel:
    """Counts `seen/kept/dropped/<reason>` per step, with a zero for every declared reason, in step order."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.names = [step.name for step in steps]
        self.counts = {
            step.name: {"seen": 0, "kept": 0, "dropped": 0, "reasons": dict.fromkeys(step.reasons, 0)}
            for step in steps
        }

    def keep(self, name: str) -> None:
        self.counts[name]["seen"] += 1
        self.counts[name]["kept"] += 1

    def drop(self, name: str, reason: str) -> None:
        counts = self.counts[name]
        if reason not in counts["reasons"]:
            raise ValueError(f"filter step {name} returned {reason!r}, which it does not declare")
        counts["seen"] += 1
        counts["dropped"] += 1
        counts["reasons"][reason] += 1

    def replay(self, steps: Sequence[Step], failed: int | None, reason: str) -> None:
        """Count an outcome computed elsewhere (a worker): kept by every step before `failed`, dropped there."""
        for index, step in enumerate(steps):
            if index == failed:
                self.drop(step.name, reason)
                return
            self.keep(step.name)

    def dropped(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for name in self.names:
            for reason, n in self.counts[name]["reasons"].items():
                totals[reason] = totals.get(reason, 0) + n
        return totals

    def to_dict(self, *, n_in: int, n_out: int) -> dict[str, Any]:
        return {
            "in": n_in,
            "out": n_out,
            "dropped": self.dropped(),
            "steps": [{"name": name, **self.counts[name]} for name in self.names],
        }


def run_steps(record: dict[str, Any], steps: Sequence[Step], funnel: Funnel) -> tuple[Step, str] | None:
    """Apply in-process steps in order; count each; return the dropping step and reason, or None when kept."""
    for step in steps:
        reason = step.check(record)
        if reason is not None:
            funnel.drop(step.name, reason)
            return step, reason
        funnel.keep(step.name)
    return None
