"""Call-based (APPS/TACO LeetCode-style) tests in the real sandbox: the model writes a function, a harness calls it.

Like tests/test_filter_sandbox.py these need bubblewrap and fail rather than skip without it."""

from __future__ import annotations

import pytest

from distill.filter import isolation, sandbox

ADD = "def add(xs, k):\n    return sum(xs) + k\n"
SOLUTION = "class Solution:\n    def add(self, xs, k):\n        return sum(xs) + k\n"


def call(expected: str, args: str = "[[1, 2], 4]", name: str = "add") -> dict[str, str]:
    return {"input": args, "output": expected, "fn_name": name}


@pytest.fixture(scope="module", autouse=True)
def _bwrap() -> None:
    assert isolation.problem("bwrap") is None, "the sandbox tests need bubblewrap: apt-get install bubblewrap"


def test_sandbox_call_module_function_passes() -> None:
    result = sandbox.run_tests(ADD, [call("7"), call("10", "[[1, 2, 3], 4]")], timeout_s=5, mode="bwrap")
    assert (result.reason, result.isolation) == ("ok", "bwrap")


def test_sandbox_call_solution_method_passes() -> None:
    assert sandbox.run_tests(SOLUTION, [call("7")], timeout_s=5, mode="bwrap").reason == "ok"


def test_sandbox_call_expected_in_one_element_list_passes() -> None:
    assert sandbox.run_tests(ADD, [call("[7]")], timeout_s=5, mode="bwrap").reason == "ok"


def test_sandbox_call_wrong_result_is_wrong_answer() -> None:
    result = sandbox.run_tests(ADD, [call("8")], timeout_s=5, mode="bwrap")
    assert result.reason == "wrong_answer"
    assert "expected 8, got 7" in result.detail


def test_sandbox_call_tuple_result_matches_list() -> None:
    code = "def pair(a, b):\n    return (b, a)\n"
    assert sandbox.run_tests(code, [call("[2, 1]", "[1, 2]", "pair")], timeout_s=5, mode="bwrap").reason == "ok"


def test_sandbox_call_float_within_tolerance_passes() -> None:
    code = "def third(x):\n    return [x / 3, {'v': x / 3}]\n"
    close, far = call('[0.3333333, {"v": 0.3333333}]', "[1]", "third"), call('[0.333, {"v": 0.333}]', "[1]", "third")
    assert sandbox.run_tests(code, [close], timeout_s=5, mode="bwrap").reason == "ok"
    assert sandbox.run_tests(code, [far], timeout_s=5, mode="bwrap").reason == "wrong_answer"


def test_sandbox_call_missing_function_is_runtime_error() -> None:
    result = sandbox.run_tests("def other(xs, k):\n    return 0\n", [call("7")], timeout_s=5, mode="bwrap")
    assert result.reason == "runtime_error"
    assert "no function named add" in result.detail


def test_sandbox_call_ignores_what_the_code_prints() -> None:
    code = "print('debug: 7')\ndef add(xs, k):\n    print(xs, end='')\n    return sum(xs) + k\n"
    assert sandbox.run_tests(code, [call("7")], timeout_s=5, mode="bwrap").reason == "ok"


def test_sandbox_call_infinite_loop_is_time_limit() -> None:
    code = "def add(xs, k):\n    while True:\n        pass\n"
    assert sandbox.run_tests(code, [call("7")], timeout_s=1, mode="bwrap").reason == "time_limit"


def test_sandbox_call_unparsable_expected_is_verify_error() -> None:
    assert sandbox.run_tests(ADD, [call("[7")], timeout_s=5, mode="bwrap").reason == "verify_error"


def test_sandbox_call_stdin_tests_unchanged() -> None:
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert sandbox.run_tests(code, [{"input": "3 4\n", "output": "7\n"}], timeout_s=5, mode="bwrap").reason == "ok"
    assert (
        sandbox.run_tests(code, [{"input": "3 4\n", "output": "8\n"}], timeout_s=5, mode="bwrap").reason
        == "wrong_answer"
    )


def test_sandbox_call_and_stdin_tests_mix() -> None:
    code = f"print('hello')\n{ADD}"
    tests = [{"input": "", "output": "hello\n"}, call("7")]
    assert sandbox.run_tests(code, tests, timeout_s=5, mode="bwrap").reason == "ok"
