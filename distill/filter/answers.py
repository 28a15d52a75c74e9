"""Answer extraction and checking for each answer kind; runs inside the verification worker processes.

Every check returns one reason from `REASONS` (`ok` when correct), so the stage and `distill verify` report the
same words. Only the text after `</think>` is ever read for an answer: a number the model tried and rejected while
thinking must not count.

math: math-verify. The gold is parsed once per problem (cached per worker); the prediction is parsed from the final
text with `\\boxed{}` outranking every other pattern (math-verify takes the rightmost match, and joins adjacent boxes
such as `\\boxed{1}, \\boxed{2}` into a set); then `verify(gold, pred)` in that order (it is not symmetric:
open-r1 #557). math-verify's own `signal.alarm` timeouts are switched off here: the worker owns the clock (see
`distill.filter.pool`). Comparison errors are `verify_error`, never quietly a wrong answer.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any

from distill.data import last_boxed

ANSWER_REASONS = ("wrong_answer", "no_answer", "verify_timeout", "verify_error")
CODE_REASONS = ("runtime_error", "time_limit", "memory_limit")
REASONS = ("ok", *ANSWER_REASONS, *CODE_REASONS)
_GOLD_CACHE: OrderedDict[tuple[str, str], Any] = OrderedDict()
_GOLD_CACHE_SIZE = 4096  # problems: a worker sees a problem's samples together, so a small cache is enough
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_ANSWER_LETTER = re.compile(r"answer\s*(?:is|:)?\s*[:\s]*\(?\**\s*([A-Z])\b", re.IGNORECASE)


class _OwnTimeout(logging.Filter):
    """Drops math-verify's "Timeout is disabled ... provide the logic for timeout interruption yourself" warning,
    which `parse` and `verify` log once per process when their timeout is None. distill passes None on purpose and
    interrupts checks itself (`distill.filter.pool`), so the warning only told every user of the filter and of
    `distill verify` to do what is already done. Every other math-verify record passes. math-verify 0.9.0 has no
    option for it (a positive timeout would arm its own `signal.alarm` against ours); drop this filter if one comes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _silence_own_timeout_warning() -> None:
    """On the loggers math-verify emits it from; they need not exist yet (math-verify is imported lazily)."""
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_OwnTimeout())


_silence_own_timeout_warning()  # at import: this module is what every verifying process (parent, workers) imports


class VerifyTimeout(BaseException):
    """Raised inside a worker when an answer check runs past its time budget. A BaseException, so that the
    `except Exception` blocks inside math-verify and sympy cannot swallow it and keep computing."""


def math_configs(match_types: tuple[str, ...] = ("latex", "expr")) -> list[Any]:
    """math-verify extraction targets; `latex` gives `\\boxed{}` the highest priority (0)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    made = {"latex": lambda: LatexExtractionConfig(boxed_match_priority=0), "expr": ExprExtractionConfig}
    return [made[name]() for name in match_types]


def warm_up() -> None:
    """Build math-verify's ANTLR parser caches: a process's first LaTeX parse costs seconds, and no trace should pay
    for that against its timeout."""
    from math_verify import parse

    for text in ("$\\frac{1}{2} + \\sqrt{3}x^2$", "\\boxed{(1, 2) \\cup [3, \\infty)}", "\\boxed{204}"):
        parse(text, math_configs(), parsing_timeout=None)


def gold_text(answer: str) -> str:
    """A bare reference answer (`\\frac{1}{2}`, `025`) as math-verify input; text with its own delimiters is kept."""
    if any(mark in answer for mark in ("$", "\\boxed", "\\(", "\\[")):
        return answer
    return f"\\boxed{{{answer}}}"


def parse_gold(text: str, *, configs: list[Any], key: str) -> Any:
    """Parse the gold once per problem (and keep it for the problem's other samples in this worker).

    A failure is cached too (as the exception), so a gold that times out costs one timeout, not one per sample."""
    from math_verify import parse

    cache_key = (key, text)
    if cache_key in _GOLD_CACHE:
        _GOLD_CACHE.move_to_end(cache_key)
        cached = _GOLD_CACHE[cache_key]
    else:
        try:
            cached = parse(text, configs, parsing_timeout=None, raise_on_error=True)
        except (Exception, VerifyTimeout) as exc:  # cached and re-raised below, so the caller counts it
            cached = exc
        _GOLD_CACHE[cache_key] = cached
        if len(_GOLD_CACHE) > _GOLD_CACHE_SIZE:
            _GOLD_CACHE.popitem(last=False)
    if isinstance(cached, BaseException):
        raise cached
    return cached


def check_math(gold: list[Any], final: str, *, configs: list[Any], verify_kwargs: dict[str, Any]) -> str:
    """Reason for one prediction text against a parsed gold: ok, wrong_answer, no_answer or verify_error."""
    from math_verify import parse, verify

    if not gold:
        return "verify_error"  # the reference itself is unparsable: not the model's fault
    try:
        pred = parse(final, configs, parsing_timeout=None, raise_on_error=True)
    except Exception:
        return "verify_error"
    if not pred:
        return "no_answer"
    failed = False
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=None, raise_on_error=True, **verify_kwargs):
                    return "ok"
            except Exception:
                failed = True
    return "verify_error" if failed else "wrong_answer"


def choice_letter(final: str, *, n_choices: int = 26) -> str | None:
    """The chosen option letter: the last `\\boxed{}` if it holds one, else the last "answer is X", else a bare
    letter as the whole final text. Letters beyond the number of options are no answer."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_choices]
    boxed = last_boxed(final)
    candidates: list[str] = []
    if boxed is not None:
        candidates = re.findall(r"\b([A-Z])\b", re.sub(r"\\text\{([^}]*)\}", r" \1 ", boxed))
    if not candidates:
        candidates = [m.group(1).upper() for m in _ANSWER_LETTER.finditer(final)]
    if not candidates and (bare := re.fullmatch(r"\W*([A-Z])\W*", final.strip())):
        candidates = [bare.group(1)]
    return candidates[-1] if candidates and candidates[-1] in letters else None


def check_choice(gold: str, final: str, *, n_choices: int) -> str:
    letter = choice_letter(final, n_choices=n_choices)
    if letter is None:
        return "no_answer"
    return "ok" if letter == gold.strip().upper() else "wrong_answer"


def final_code(final: str) -> str | None:
    """Body of the last fenced code block in the final text (any language tag), or None."""
    blocks = _FENCE.findall(final)
    return blocks[-1][1] if blocks else None


def has_answer(kind: str, final: str, *, n_choices: int = 26) -> bool:
    """Whether the final text carries an answer in the form the kind requires (used by the `no_answer` filter)."""
    if kind == "math":
        return bool((last_boxed(final) or "").strip())
    if kind == "choice":
        return choice_letter(final, n_choices=n_choices) is not None
    if kind == "code":
        return final_code(final) is not None
    return bool(final.strip())


def check(item: dict[str, Any], *, timeout_s: float, sandbox: str = "bwrap") -> str:
    """Reason for one item {kind, answer, final, choices?, tests?}; kind `none` is never passed here. Code runs
    under the `sandbox` mode (`filter.sandbox`), which the stage has checked before the first code item."""
    kind = item["kind"]
    if kind in ("math", "choice") and item.get("answer") in (None, ""):
        return "verify_error"  # no reference to check against: not the model's fault, and not a pass
    if kind == "math":
        configs = math_configs()
        gold = parse_gold(gold_text(str(item["answer"])), configs=configs, key="default")
        return check_math(gold, item["final"], configs=configs, verify_kwargs={})
    if kind == "choice":
        return check_choice(str(item["answer"]), item["final"], n_choices=len(item.get("choices") or []) or 26)
    if kind == "code":
        from distill.filter.sandbox import run_tests

        code = final_code(item["final"])
        if code is None:
            return "no_answer"
        return run_tests(code, item.get("tests") or [], timeout_s=timeout_s, mode=sandbox).reason  # type: ignore[arg-type]
    raise ValueError(f"no verifier for kind {kind!r}")
