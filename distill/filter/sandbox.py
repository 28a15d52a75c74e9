"""Run generated code against its tests in the sandbox the recipe chose (`distill.filter.isolation`).

Each test runs in a fresh directory, in a separate process with CPU-time, address-space, file-size and
process-count rlimits and a wall timeout. stdin, stdout and stderr are pipes the parent holds (no file the program
could rewrite, seek or truncate), stdout is capped at `OUTPUT_BYTES`, and whatever the program started is killed
before its output is judged.

Output is compared line by line with trailing whitespace and trailing blank lines ignored, and every expected line
is required (open-r1's `zip()` comparison let a program that printed only a prefix pass).

Call-based tests (APPS/TACO LeetCode-style problems, where the model writes a function, not a program) carry a
`fn_name`: `input` is the JSON array of positional arguments and `output` the JSON of the expected return value.
`call_harness.py` is then the main program: it gets a fresh secret on stdin before the model's code runs and
reports the call's JSON result on a line only that secret authenticates, so no program can forge its verdict by
printing one. Results are compared as the APPS reference harness does (see `compare_call`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distill.filter import isolation
from distill.filter.isolation import Mode

MEMORY_BYTES = 1 << 30  # address space per process; Python itself needs ~30 MB, a test program rarely > 256 MB
FILE_BYTES = 16 << 20  # any file the program writes
OUTPUT_BYTES = 16 << 20  # stdout or stderr past this stops the program (`runtime_error`)
NPROC = 128  # processes the sandboxed code may add (the limit is per user: shared by concurrent sandboxes)
DETAIL_CHARS = 400
HARNESS = Path(__file__).with_name("call_harness.py")
RESULT_MARKER = "\x1e__distill_result__:"  # the harness's report line starts with this, then the run's secret


@dataclass(frozen=True)
class SandboxResult:
    reason: str  # ok | wrong_answer | runtime_error | time_limit | memory_limit | verify_error
    detail: str = ""  # stderr tail or what differed, for debugging a rejected row
    isolation: str = ""


@functools.cache
def _nproc_limit() -> int:
    """RLIMIT_NPROC counts every task (thread) of the real user. As root the sandbox runs as nobody, who owns
    nothing else; otherwise the user's own tasks (this pipeline's threads included) are counted on top."""
    if os.geteuid() == 0:
        return NPROC
    uid, tasks = os.getuid(), 0
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if proc.stat().st_uid == uid:
                tasks += len(os.listdir(proc / "task"))
    return tasks + NPROC


def _limits(cpu_s: int, nproc: int) -> None:
    """preexec_fn: runs in the child between fork and exec (the worker is single-threaded, so this is safe)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def compare(expected: str, actual: str) -> str | None:
    """None when every expected line is there and nothing else; else a short description of the first difference."""
    want = [line.rstrip() for line in expected.rstrip().splitlines()]
    got = [line.rstrip() for line in actual.rstrip().splitlines()]
    for index, line in enumerate(want):
        if index >= len(got):
            return f"missing line {index + 1} of {len(want)}: expected {line[:80]!r}"
        if got[index] != line:
            return f"line {index + 1}: expected {line[:80]!r}, got {got[index][:80]!r}"
    return f"{len(got) - len(want)} extra line(s)" if len(got) > len(want) else None


def _same(want: object, got: object) -> bool:
    """Equality of decoded JSON, with floats compared approximately at any depth (JSON already made tuples lists)."""
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(_same(w, g) for w, g in zip(want, got, strict=True))
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(_same(want[key], got[key]) for key in want)
    if isinstance(want, float | int) and isinstance(got, float | int) and float in (type(want), type(got)):
        return math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9)
    return want == got


def compare_call(want: object, stdout: str, *, secret: str) -> str | None:
    """None when the harness's report equals `want`, or `want` is a one-element list holding it (APPS wraps some
    expected values in a list); else a short description. Only a line carrying this run's `secret` is a report."""
    prefix = RESULT_MARKER + secret + ":"
    reports = [line[len(prefix) :] for line in stdout.split("\n") if line.startswith(prefix)]  # \x1e splits lines
    if len(reports) != 1:
        forged = " (result lines without this run's secret were ignored)" if RESULT_MARKER in stdout else ""
        return f"{len(reports) or 'no'} result lines: the function was not called by the harness{forged}"
    text = reports[0]
    try:
        got = json.loads(text)
    except ValueError:
        return f"result is not JSON: {text[:80]!r}"
    if _same(want, got) or (isinstance(want, list) and len(want) == 1 and _same(want[0], got)):
        return None
    return f"expected {json.dumps(want)[:80]}, got {text[:80]}"


def run_once(
    code: str, stdin: str, *, timeout_s: float, mode: Mode, fn_name: str | None = None
) -> tuple[SandboxResult, str, str]:
    """Run `code` once with `stdin` under `mode`; returns the result (reason `ok` = exited 0), the program's stdout
    and, for a call-based run (`fn_name`: `stdin` is the JSON array of arguments), the secret its report carries."""
    workdir = Path(tempfile.mkdtemp(prefix="distill-sandbox-"))
    try:
        isolation.own(workdir)
        secret = ""
        if fn_name is None:
            (workdir / "main.py").write_text(code, encoding="utf-8")
            args = ["main.py"]
        else:
            secret = secrets.token_hex(16)
            (workdir / "solution.py").write_text(code, encoding="utf-8")
            shutil.copyfile(HARNESS, workdir / HARNESS.name)
            args, stdin = [HARNESS.name, fn_name], f"{secret}\n{stdin}"
        proc = subprocess.Popen(
            isolation.command(mode, workdir, args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=functools.partial(_limits, max(1, int(timeout_s + 0.999)), _nproc_limit()),
            env=isolation.environment(str(workdir)),
            **isolation.popen_user(mode),
        )
        finished, stdout, stderr = _communicate(proc, stdin.encode(), timeout_s=timeout_s)
        returncode = _stop(proc)
        out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
        if finished is None:
            return SandboxResult("runtime_error", f"output over {OUTPUT_BYTES >> 20} MiB", mode), "", secret
        if not finished:
            return SandboxResult("time_limit", f"wall timeout {timeout_s}s", mode), "", secret
        return SandboxResult(_classify(returncode, err), err[-DETAIL_CHARS:], mode), out, secret
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _communicate(proc: subprocess.Popen, data: bytes, *, timeout_s: float) -> tuple[bool | None, bytes, bytes]:
    """Feed stdin, read stdout and stderr until the program has exited and both pipes are closed. Returns
    (True, out, err) when it finished in time, (False, ...) at the wall timeout, (None, ...) when its output went
    past the cap. Once the program exits, the rest of its process group is killed, so nothing writes after it."""
    deadline = time.monotonic() + timeout_s
    streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}  # type: ignore[union-attr]
    feed, stdin = memoryview(data), proc.stdin.fileno()  # type: ignore[union-attr]
    exited = False
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        if feed:
            os.set_blocking(stdin, False)
            selector.register(stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()  # type: ignore[union-attr]
        while selector.get_map() or not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, b"", b""
            for key, _ in selector.select(min(left, 0.05 if selector.get_map() else 0.002)):
                if key.fd == stdin:
                    try:
                        feed = feed[os.write(stdin, feed[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the program stopped reading: what it did not read is its loss
                        feed = feed[:0]
                    if not feed:
                        selector.unregister(stdin)
                        proc.stdin.close()  # type: ignore[union-attr]
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                streams[key.fd] += chunk
                if len(streams[key.fd]) > OUTPUT_BYTES:
                    return None, b"", b""
            if not exited and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                exited = True  # not reaped yet, so its pid (the process group's id) cannot be reused
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
    out, err = streams.values()
    return True, bytes(out), bytes(err)


def _stop(proc: subprocess.Popen) -> int:
    """Kill the sandbox if it still runs and wait until every process it started is gone; returns its exit code.

    Under bwrap the outer process is left alive at first: it reaps the pid namespace's init, whose death makes the
    kernel kill and wait for everything inside, so once the outer process exits the namespace is empty and the next
    test's process count starts from zero (killing the outer process first leaves a fork bomb dying in the
    background). `unshare --pid --kill-child` behaves the same; under `rlimits` the process group is killed."""
    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # exited, unreaped: the group id is still its
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
        try:
            proc.wait(timeout=10 if children else 0.1)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            pipe.close()  # type: ignore[union-attr]
    return proc.wait()


def _classify(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "ok"
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "time_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    return "runtime_error"


def run_tests(code: str, tests: list[dict[str, str]], *, timeout_s: float, mode: Mode) -> SandboxResult:
    """Run every test (in order, stopping at the first failure) under `mode`; `ok` only when all pass. A test with
    `fn_name` is call-based (see the module docstring); its expected JSON is parsed first, so a broken test is a
    verify_error."""
    if not tests:
        return SandboxResult("verify_error", "problem has no tests", mode)
    for index, test in enumerate(tests):
        fn_name = test.get("fn_name")
        try:
            want = json.loads(test["output"]) if fn_name is not None else None
        except ValueError as exc:
            return SandboxResult("verify_error", f"test {index + 1}: expected output is not JSON: {exc}", mode)
        result, stdout, secret = run_once(code, test["input"], timeout_s=timeout_s, mode=mode, fn_name=fn_name)
        if result.reason != "ok":
            return SandboxResult(result.reason, f"test {index + 1}: {result.detail}", mode)
        diff = compare_call(want, stdout, secret=secret) if fn_name is not None else compare(test["output"], stdout)
        if diff is not None:
            return SandboxResult("wrong_answer", f"test {index + 1}: {diff}", mode)
    return SandboxResult("ok", f"{len(tests)} test(s) passed", mode)
