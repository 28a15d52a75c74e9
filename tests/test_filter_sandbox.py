"""The code sandbox on hostile programs: each is stopped and reported, and the machine is left as it was.

These need bubblewrap (`apt-get install bubblewrap`; CI's .ci/run installs it): without it the file-system and
process-count isolation under test does not exist, so the tests fail rather than skip."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from distill.filter import answers, isolation, sandbox

ADD = "a, b = map(int, input().split())\nprint(a + b)\nprint(a * b)\n"
TESTS = [{"input": "3 4\n", "output": "7\n12\n"}, {"input": "2 5", "output": "7\n10"}]


@pytest.fixture(scope="module", autouse=True)
def _bwrap() -> None:
    assert isolation.problem("bwrap") is None, "the sandbox tests need bubblewrap: apt-get install bubblewrap"


def test_filter_sandbox_correct_code_passes() -> None:
    result = sandbox.run_tests(ADD, TESTS, timeout_s=5, mode="bwrap")
    assert (result.reason, result.isolation) == ("ok", "bwrap")


def test_filter_sandbox_prefix_of_expected_lines_fails() -> None:
    result = sandbox.run_tests("a, b = map(int, input().split())\nprint(a + b)\n", TESTS, timeout_s=5, mode="bwrap")
    assert result.reason == "wrong_answer"
    assert "missing line 2" in result.detail


def test_filter_sandbox_extra_lines_fail() -> None:
    assert sandbox.compare("7\n", "7\n8\n") == "1 extra line(s)"
    assert sandbox.compare("7\n12", "7  \n12\n\n") is None  # trailing spaces and blank lines do not matter


def test_filter_sandbox_has_no_network() -> None:
    """A server on the host's loopback is reachable from here, and not from inside the sandbox."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    result = sandbox.run_tests(code, [{"input": "", "output": "connected"}], timeout_s=5, mode="bwrap")
    server.close()
    assert result.reason == "runtime_error"
    assert "Connection refused" in result.detail or "unreachable" in result.detail


def test_filter_sandbox_cannot_write_outside_its_dir(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    code = f"open({str(target)!r}, 'w').write('x')\n"
    result = sandbox.run_tests(code, [{"input": "", "output": ""}], timeout_s=5, mode="bwrap")
    assert result.reason == "runtime_error"
    assert not target.exists()


def _sandbox_processes() -> int:
    out = subprocess.run(["ps", "-u", str(isolation.NOBODY), "-o", "pid="], capture_output=True, text=True).stdout
    return len(out.split())


def test_filter_sandbox_stops_a_fork_bomb_and_cleans_up() -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = sandbox.run_tests(bomb, [{"input": "", "output": ""}], timeout_s=2, mode="bwrap")
    assert result.reason == "time_limit"
    assert time.monotonic() - start < 20
    assert _sandbox_processes() == 0  # the whole pid namespace is gone before run_tests returns
    assert sandbox.run_tests(ADD, TESTS, timeout_s=5, mode="bwrap").reason == "ok"  # and the next program can start


def test_filter_sandbox_stops_an_8gb_allocation() -> None:
    result = sandbox.run_tests("x = bytearray(8 * 2**30)\n", [{"input": "", "output": ""}], timeout_s=5, mode="bwrap")
    assert result.reason == "memory_limit"


def test_filter_sandbox_wall_timeout() -> None:
    result = sandbox.run_tests(
        "import time\ntime.sleep(60)\n", [{"input": "", "output": ""}], timeout_s=1, mode="bwrap"
    )
    assert result.reason == "time_limit"


def test_filter_code_answer_uses_final_code_block() -> None:
    final = f"First try:\n```python\nprint(0)\n```\nFixed:\n```python\n{ADD}```\n"
    item = {"kind": "code", "final": final, "tests": TESTS, "answer": None}
    assert answers.check(item, timeout_s=5) == "ok"
    assert answers.check({**item, "final": "no code"}, timeout_s=5) == "no_answer"
