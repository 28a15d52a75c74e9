"""The record contract: what flows between stages on disk.

Every stage reads and writes JSON Lines of these rows, so `datasets.load_dataset("json", data_files=...)` reads
any stage's output as is. Field names here are the contract; change them only with a migration note.

- `Problem`: one problem from a data source, with a stable `id` (hash of source + problem text).
- `Trace`: one teacher sample for a problem: the problem's fields plus what the teacher saw and said.
- `verdict`: the mapping `{correct, reason}` the filter and eval attach to a trace row (`reason` is `ok` when
  correct; `correct` is null for a trace that was not verified).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Kind = Literal["math", "choice", "code", "none"]
KINDS: tuple[str, ...] = get_args(Kind)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Finish reasons of a sample that was cut short: never scored, dropped by the filter as `truncated`. `length` is
# max_tokens (vLLM, OpenAI API); `timeout` a sample whose endpoint went silent through every retry; `abort` a
# request the engine gave up on; `content_filter` / `insufficient_system_resource` an API that stopped early.
CUT_SHORT = frozenset({"length", "timeout", "abort", "content_filter", "insufficient_system_resource"})


def problem_id(source: str, problem: str) -> str:
    """Stable id: the same problem text from the same source always gets the same id, across runs and machines."""
    return hashlib.sha256(f"{source}\0{problem.strip()}".encode()).hexdigest()[:16]


@dataclass(kw_only=True)
class Problem:
    """One problem, as every data source is normalised to (see `datasets/*.yaml` for the field mappings)."""

    id: str
    source: str  # dataset spec name the problem came from
    kind: Kind  # picks the verifier in the filter and the default prompt in the teacher
    problem: str
    answer: str | None  # reference answer (a letter for `choice`); None only for kind `none`/`code`
    solution: str | None = None  # reference solution text, when the source has one
    choices: list[str] | None = None  # answer options in display order, for kind `choice`
    tests: list[dict[str, str]] | None = None  # [{"input": stdin, "output": expected stdout}], for kind `code`
    meta: dict[str, str] = field(default_factory=dict)  # other source columns, as strings so Arrow can mix sources

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any], *, where: str) -> Problem:
        """Build from a JSONL row; `where` (e.g. `file:line`) goes into the error when the row is malformed."""
        return _from_dict(cls, row, where=where)


@dataclass(kw_only=True)
class Trace(Problem):
    """One teacher sample. `completion` is the assistant text exactly as produced, including a forced `<think>\\n`."""

    sample: int  # index of this sample among the problem's n samples; (id, sample) is unique
    prompt: list[dict[str, str]]  # chat messages the teacher saw (system?, user)
    completion: str
    reasoning: str  # text inside <think>...</think> ("" when there is none)
    final: str  # text after </think> (the whole completion when </think> is missing)
    finish_reason: str  # "stop", or one of CUT_SHORT, or backend-specific
    prompt_tokens: int  # 0 when unknown: a sample that timed out before the server reported its usage
    completion_tokens: int
    teacher: str  # model id or path, as configured (`teacher.model`)
    sampling: dict[str, Any]  # the sampling settings that produced it
    latency_s: float = 0.0
    # What an endpoint said it ran (None offline, and in rows written before these fields): an alias such as
    # `deepseek-reasoner` moves between models, so `teacher` alone does not say whose traces these are.
    reported_model: str | None = None
    system_fingerprint: str | None = None
    # Tokens inside the think block under `teacher.thinking_budget` (generated + `wait_text`, without the forced
    # `</think>`); None without a budget, and in rows written before this field.
    thinking_tokens: int | None = None

    @classmethod
    def from_dict(cls, row: dict[str, Any], *, where: str) -> Trace:
        return _from_dict(cls, row, where=where)


def split_reasoning(completion: str) -> tuple[str, str]:
    """Split an R1-style completion into (reasoning, final answer text).

    The reasoning is what lies between the first `<think>` (optional: the forced prefix may be absent from the text)
    and the last `</think>`; the final text is what follows it. Without `</think>` the reasoning never ended: the
    whole completion is returned as `final`, and the filter calls that truncated.
    """
    head, sep, tail = completion.rpartition(THINK_CLOSE)
    if not sep:
        return "", completion
    start = head.find(THINK_OPEN)
    reasoning = head[start + len(THINK_OPEN) :] if start >= 0 else head
    return reasoning.strip("\n"), tail.lstrip("\n")


def _from_dict(cls: type, row: dict[str, Any], *, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - row.keys())
    if missing:
        raise ValueError(f"{where}: {cls.__name__} row lacks {', '.join(missing)} (has {', '.join(sorted(row))})")
    if row.get("kind") not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {row.get('kind')!r}")
    return cls(**{k: v for k, v in row.items() if k in names})
