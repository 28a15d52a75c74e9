"""The verifier path (answers + worker pool) on real strings: Math-Verify's own cases, adversarial inputs, choice
letters, and the hard timeout. Nothing is mocked: real math-verify, real worker processes."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.filter import answers
from distill.filter.pool import GRACE_S, VerifyPool
from distill.filter.steps import AnswerMatches, Truncated


def _cases(shared_data: Path) -> list[dict]:
    path = shared_data / "verifier_cases" / "math_verify_cases.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _item(final: str, answer: str | None = "3", kind: str = "math", **extra) -> dict:
    return {
        "kind": kind,
        "answer": answer,
        "final": final,
        "reasoning": "r",
        "finish_reason": "stop",
        "has_close": True,
        "problem": "p",
        "choices": None,
        "tests": None,
        **extra,
    }


def test_filter_math_verify_cases_reproduce_expected(shared_data: Path) -> None:
    """All 268 cases, with each case's recorded comparator settings, through parse_gold + check_math."""
    rows = _cases(shared_data)
    assert len(rows) == 268
    wrong, reasons = [], {}
    for row in rows:
        kwargs = row["kwargs"]
        if row["comparator"] == "compare_strings":
            configs = answers.math_configs(tuple(kwargs["match_types"]))
            verify_kwargs = {
                "float_rounding": kwargs.get("precision", 6),
                "strict": kwargs.get("strict", True),
                "allow_set_relation_comp": kwargs.get("allow_set_relation_comp", False),
            }
        else:  # verify(parse(gold), parse(pred)) with math-verify's defaults
            from math_verify import ExprExtractionConfig, LatexExtractionConfig

            configs, verify_kwargs = [LatexExtractionConfig(), ExprExtractionConfig()], {}
        gold = answers.parse_gold(row["gold"], configs=configs, key=json.dumps(kwargs, sort_keys=True))
        reason = answers.check_math(gold, row["pred"], configs=configs, verify_kwargs=verify_kwargs)
        reasons[reason] = reasons.get(reason, 0) + 1
        if (reason == "ok") != bool(row["expected"]):
            wrong.append((row["source_file"], row["line"], row["gold"][:60], row["pred"][:60], reason))
    assert not wrong, wrong
    assert set(reasons) <= set(answers.REASONS)
    assert reasons["ok"] == 230


def test_filter_gold_text_wraps_bare_answers_only() -> None:
    assert answers.gold_text("\\frac{1}{2}") == "\\boxed{\\frac{1}{2}}"
    assert answers.gold_text("$x=1$") == "$x=1$"


@pytest.mark.parametrize(
    ("answer", "final", "expected"),
    [
        ("025", "so the answer is \\boxed{25}", "ok"),  # zero-padded AIME gold compares as a number
        ("\\frac{1}{2}", "Therefore \\boxed{0.5}.", "ok"),
        ("204", "I first got 205. The answer is \\boxed{204}", "ok"),
        ("204", "\\boxed{205}", "wrong_answer"),
        ("3", "no number here at all", "no_answer"),
        ("(1, 2)", "\\boxed{(2, 1)}", "wrong_answer"),  # a tuple is ordered
        (None, "\\boxed{3}", "verify_error"),  # no reference: never a pass, never the model's fault
    ],
)
def test_filter_check_math_table(answer: str, final: str, expected: str) -> None:
    assert answers.check(_item(final, answer), timeout_s=5) == expected


def test_filter_prediction_read_only_after_think() -> None:
    """The think block holds \\boxed{3} but the final answer is 4: wrong, because only the final text counts."""
    from distill.records import split_reasoning

    reasoning, final = split_reasoning("<think>\nmaybe \\boxed{3}?\n</think>\n\nThe answer is \\boxed{4}.")
    assert "\\boxed{3}" in reasoning
    assert answers.check(_item(final, "3"), timeout_s=5) == "wrong_answer"


@pytest.mark.parametrize(
    ("final", "letter"),
    [
        ("The answer is (C).", "C"),
        ("\\boxed{B}", "B"),
        ("\\boxed{\\text{D}}", "D"),
        ("A", "A"),
        ("no idea", None),
        ("Answer: E", None),
    ],  # E is out of range for 4 options
)
def test_filter_choice_letter(final: str, letter: str | None) -> None:
    assert answers.choice_letter(final, n_choices=4) == letter


def test_filter_check_choice_against_gold() -> None:
    assert answers.check(_item("\\boxed{B}", "B", kind="choice", choices=list("wxyz")), timeout_s=5) == "ok"
    assert answers.check(_item("\\boxed{C}", "B", kind="choice", choices=list("wxyz")), timeout_s=5) == "wrong_answer"


def test_filter_adversarial_inputs_finish_within_timeout() -> None:
    timeout = 2.0
    items = [
        _item("\\boxed{9^{9^{9^{9}}}}", "1"),
        _item("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1"),
        _item("x " * 2_500_000 + "\\boxed{3}", "3"),  # a 5 MB response
        _item("\\boxed{3}", "3"),
    ]
    steps = [Truncated(), AnswerMatches(verify=True, timeout_s=timeout, sandbox="bwrap")]
    with VerifyPool(steps=steps, workers=2, timeout_s=timeout) as pool:
        for item in items:
            start = time.monotonic()
            [[outcome]] = list(pool.imap([[item]]))
            assert time.monotonic() - start < timeout + GRACE_S + 1, item["final"][:40]
            assert outcome[1] in {"ok", *AnswerMatches.reasons}
    assert outcome == (None, "ok")  # the pool still works after the timeouts


class _Stall(AnswerMatches):
    """Blocks SIGALRM and sleeps: what a sympy call stuck in C code looks like to the worker's own timer."""

    def check(self, record: dict) -> str | None:
        if record["final"] == "stall":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(120)
        return super().check(record)


def test_filter_hard_timeout_kills_a_stuck_worker_and_goes_on() -> None:
    steps = [_Stall(verify=True, timeout_s=1.0, sandbox="bwrap")]
    tasks = [[_item("\\boxed{3}"), _item("stall"), _item("\\boxed{4}")], [_item("\\boxed{3}")]]
    start = time.monotonic()
    with VerifyPool(steps=steps, workers=1, timeout_s=1.0) as pool:
        results = list(pool.imap(tasks))
        assert pool.killed == 1
    assert time.monotonic() - start < 30
    assert results == [[(None, "ok"), (0, "verify_timeout"), (0, "wrong_answer")], [(None, "ok")]]


def test_filter_worker_setup_failure_fails_clearly(tmp_path: Path) -> None:
    from distill.errors import DistillError
    from distill.filter.steps import TooLong

    steps = [
        TooLong(model=str(tmp_path / "no-such-model"), max_tokens=10),
        AnswerMatches(verify=True, timeout_s=1, sandbox="bwrap"),
    ]
    with (
        pytest.raises(DistillError, match="filter worker failed"),
        VerifyPool(steps=steps, workers=1, timeout_s=1) as pool,
    ):
        list(pool.imap([[_item("\\boxed{3}")]]))


def test_filter_verify_path_prints_no_math_verify_timeout_warning(tmp_path: Path) -> None:
    """math-verify warns once per process that its own timeout is off (distill's pool owns the clock), so only a
    fresh process shows what a user sees: `distill verify` through the fork server, workers and AnswerMatches."""
    rows = [{"gold": "3", "out": "\\boxed{3}"}, {"gold": "\\frac{1}{2}", "out": "so \\boxed{0.4}"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["verify", "in.jsonl", "--answer-field", "gold", "--response-field", "out", "--output", "out.jsonl"]
    proc = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args, "--workers", "1", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Timeout is disabled" not in proc.stdout + proc.stderr
    verdicts = [json.loads(line)["verdict"]["reason"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert verdicts == ["ok", "wrong_answer"]  # math-verify really ran


def test_filter_silences_only_math_verify_timeout_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="math_verify")
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).warning("Timeout is disabled as parsing_timeout is None or <= 0, you must provide")
        logging.getLogger(name).warning("Failed to parse gold: %s", name)
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to parse gold: math_verify.parser",
        "Failed to parse gold: math_verify.grader",
    ]
