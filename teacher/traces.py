"""Trace rows and running totals shared by both backends.

A backend turns problems into finished problems (all n samples of one problem together) and hands them, in
completion order, to an `OnDone` callback; it counts tokens, skips and retries in a `GenerationStats` as it goes.
Handing over whole problems is what makes resume exact: a problem is either entirely on disk or regenerated.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distill.records import Problem, Trace, split_reasoning

OnDone = Callable[[list[list[Trace]]], None]  # receives finished problems, each as its list of n traces


@dataclass
class GenerationStats:
    """Running totals of one generation call; the progress bar and the manifest read them."""

    price_input_per_m: float = 0.0  # USD per million prompt tokens (API teachers)
    price_output_per_m: float = 0.0
    problems: int = 0  # problems finished (all samples)
    traces: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # problems not sent, by reason
    skipped_ids: dict[str, str] = field(default_factory=dict)  # problem id -> reason
    retries: Counter[str] = field(default_factory=Counter)  # retried requests, by cause (API teachers)
    gave_up: Counter[str] = field(default_factory=Counter)  # samples kept cut short when retries ran out, by reason
    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.price_input_per_m + self.completion_tokens * self.price_output_per_m) / 1e6

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def cpu_s(self) -> float:
        """CPU time of this process since the call started: a busy shared machine inflates wall time, not this."""
        return time.process_time() - self.cpu_started

    def restart_clock(self) -> None:
        """Start timing here (after the engine or endpoint is ready): rates measure generation, not start-up."""
        self.started, self.cpu_started = time.monotonic(), time.process_time()

    @property
    def tokens_per_s(self) -> float:
        """Generated (completion) tokens per second of wall time since the call started."""
        return self.completion_tokens / max(self.elapsed_s, 1e-9)

    def skip(self, problem: Problem, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_ids[problem.id] = reason

    def add(self, traces: list[Trace]) -> None:
        self.problems += 1
        self.traces += len(traces)
        self.prompt_tokens += sum(t.prompt_tokens for t in traces)
        self.completion_tokens += sum(t.completion_tokens for t in traces)


def make_trace(
    problem: Problem,
    *,
    sample: int,
    prompt: list[dict[str, str]],
    completion: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    teacher: str,
    sampling: dict[str, Any],
    latency_s: float,
    reported_model: str | None = None,
    system_fingerprint: str | None = None,
    thinking_tokens: int | None = None,
) -> Trace:
    """One normalised row: the problem's fields, what the teacher saw and said, and what it cost. An endpoint passes
    the model and fingerprint it reported (offline vLLM has none); budget forcing, the thinking tokens it counted."""
    reasoning, final = split_reasoning(completion)
    return Trace(
        **{f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem)},  # shallow: n traces share them
        sample=sample,
        prompt=prompt,
        completion=completion,
        reasoning=reasoning,
        final=final,
        finish_reason=finish_reason or "unknown",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        teacher=teacher,
        sampling=sampling,
        latency_s=round(latency_s, 4),
        reported_model=reported_model,
        system_fingerprint=system_fingerprint,
        thinking_tokens=thinking_tokens,
    )
