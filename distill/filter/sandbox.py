"""Run generated code against stdin/stdout tests, isolated as well as the machine allows.

Each test runs in a fresh temp dir, in a separate process with CPU-time, address-space, file-size and process-count
rlimits, a wall timeout, and no network. Isolation, strongest first (probed once, recorded in the stage report):

- `bwrap`: bubblewrap (Debian `bubblewrap`): new net/pid/ipc/uts/user namespaces, read-only /usr, only the temp
  dir writable, the whole pid namespace dies with the sandbox;
- `unshare`: `unshare -n` (no network), rlimits; the file system is not hidden;
- `rlimits`: rlimits and the wall timeout only.

When distill runs as root the sandbox drops to uid/gid 65534 (nobody), because the kernel exempts root from the
process-count limit (a fork bomb as root spawned 30k processes in our probe). The code runs under the system
`python3` in isolated mode (`-I -S`: standard library only, no site-packages).
Output is compared line by line with trailing whitespace and trailing blank lines ignored, and every expected line
is required (open-r1's `zip()` comparison let a program that printed only a prefix pass).

Call-based tests (APPS/TACO LeetCode-style problems, where the model writes a function, not a program) carry a
`fn_name`: `input` is the JSON array of positional arguments and `output` the JSON of the expected return value.
A small harness appended to the code reads the arguments from stdin, calls the module-level function of that name
(else the method of `Solution()`), and prints the JSON result after a marker, so whatever the code itself printed is
ignored. Results are compared as the APPS reference harness does (see `compare_call`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MEMORY_BYTES = 1 << 30  # address space per process; Python itself needs ~30 MB, a test program rarely > 256 MB
FILE_BYTES = 16 << 20  # any file the program writes, stdout and stderr included (they go to files)
NPROC = 128  # processes the sandboxed code may add (the limit is per user: shared by concurrent sandboxes)
NOBODY = 65534
DETAIL_CHARS = 400
RESULT_MARKER = "\x1e__distill_result__:"  # starts the harness's output line; no plausible program prints it
# Appended to main.py for a call-based test. A function keeps its names out of the model's namespace, and a missing
# function exits non-zero so it is reported as a runtime_error, not as a wrong answer.
CALL_HARNESS = """

def __distill_call(name, marker):
    import json, sys
    fn = globals().get(name)
    if not callable(fn) and isinstance(globals().get("Solution"), type):
        fn = getattr(globals()["Solution"](), name, None)
    if not callable(fn):
        sys.exit(f"no function named {name}")
    result = json.dumps(fn(*json.loads(sys.stdin.read())))
    sys.stdout.write("\\n" + marker + result + "\\n")


__distill_call(%r, %r)
"""


@dataclass(frozen=True)
class SandboxResult:
    reason: str  # ok | wrong_answer | runtime_error | time_limit | memory_limit | verify_error
    detail: str = ""  # stderr tail or what differed, for debugging a rejected row
    isolation: str = ""


def interpreter() -> str:
    """System python3 (readable by the unprivileged sandbox user), else the running interpreter."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _bwrap_args(workdir: Path) -> list[str]:
    args = [
        "bwrap",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for link in ("lib", "lib64", "bin", "sbin"):
        if Path(f"/{link}").is_symlink():
            args += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        elif Path(f"/{link}").is_dir():
            args += ["--ro-bind", f"/{link}", f"/{link}"]
    return [
        *args,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--bind",
        str(workdir),
        "/sandbox",
        "--chdir",
        "/sandbox",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
    ]


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


def _command(kind: str, workdir: Path, args: list[str]) -> list[str]:
    inner = [interpreter(), "-I", "-S", *args]
    if kind == "bwrap":
        return [*_bwrap_args(workdir), *inner]
    if kind == "unshare":  # needs root for the namespace, so it switches to nobody itself
        drop = ["--setuid", str(NOBODY), "--setgid", str(NOBODY)] if os.geteuid() == 0 else []
        return ["unshare", "-n", *drop, *inner]
    return inner


def _user(kind: str) -> dict[str, int | list[int]]:
    """Popen arguments that drop root to nobody before exec (bwrap then builds an unprivileged user namespace)."""
    if os.geteuid() != 0 or kind == "unshare":
        return {}
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


@functools.cache
def isolation() -> str:
    """The strongest isolation that actually works here: `bwrap`, `unshare` or `rlimits`."""
    probe = Path(tempfile.mkdtemp(prefix="distill-probe-"))
    try:
        _own(probe)
        for kind in ("bwrap", "unshare"):
            if shutil.which(kind) is None:
                continue
            try:
                done = subprocess.run(
                    _command(kind, probe, ["-c", "pass"]), capture_output=True, timeout=30, cwd=probe, **_user(kind)
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if done.returncode == 0:
                return kind
        return "rlimits"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


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


def compare_call(want: object, stdout: str) -> str | None:
    """None when the harness's result equals `want`, or `want` is a one-element list holding it (APPS wraps some
    expected values in a list); else a short description. The result is the text after the last marker."""
    if RESULT_MARKER not in stdout:
        return "no result: the code exited before the function was called"
    text = stdout.rpartition(RESULT_MARKER)[2].partition("\n")[0]
    try:
        got = json.loads(text)
    except ValueError:
        return f"result is not JSON: {text[:80]!r}"
    if _same(want, got) or (isinstance(want, list) and len(want) == 1 and _same(want[0], got)):
        return None
    return f"expected {json.dumps(want)[:80]}, got {text[:80]}"


def run_once(code: str, stdin: str, *, timeout_s: float, fn_name: str | None = None) -> tuple[SandboxResult, str]:
    """Run `code` once with `stdin`; returns the result (reason `ok` = exited 0) and the program's stdout.
    With `fn_name` the call harness is appended, and `stdin` is the JSON array of the function's arguments."""
    kind = isolation()
    workdir = Path(tempfile.mkdtemp(prefix="distill-sandbox-"))
    try:
        _own(workdir)
        if fn_name is not None:
            code += CALL_HARNESS % (fn_name, RESULT_MARKER)
        (workdir / "main.py").write_text(code, encoding="utf-8")
        (workdir / "stdin.txt").write_text(stdin, encoding="utf-8")
        script = "main.py" if kind == "bwrap" else str(workdir / "main.py")
        cpu = max(1, int(timeout_s + 0.999))
        with (
            (workdir / "stdin.txt").open("rb") as fin,
            open(workdir / ".out", "wb") as out,
            open(workdir / ".err", "wb") as err,
        ):
            proc = subprocess.Popen(
                _command(kind, workdir, [script]),
                stdin=fin,
                stdout=out,
                stderr=err,
                cwd=workdir,
                start_new_session=True,
                preexec_fn=functools.partial(_limits, cpu, _nproc_limit()),
                env={"PATH": "/usr/bin:/bin"},
                **_user(kind),
            )
            try:
                code_ = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                return SandboxResult("time_limit", f"wall timeout {timeout_s}s", kind), ""
        stdout = (workdir / ".out").read_text(encoding="utf-8", errors="replace")
        stderr = (workdir / ".err").read_text(encoding="utf-8", errors="replace")
        return SandboxResult(_classify(code_, stderr), stderr[-DETAIL_CHARS:], kind), stdout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the sandbox and wait until every process it started is gone.

    Under bwrap the outer process is left alive: it reaps the pid namespace's init, whose death makes the kernel
    kill and wait for everything inside, so once the outer process exits the namespace is empty and the next test's
    process count starts from zero (killing the outer process first leaves the fork bomb dying in the background)."""
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _classify(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "ok"
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "time_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    return "runtime_error"


def run_tests(code: str, tests: list[dict[str, str]], *, timeout_s: float) -> SandboxResult:
    """Run every test (in order, stopping at the first failure); `ok` only when all pass. A test with `fn_name` is
    call-based (see the module docstring); its expected JSON is parsed first, so a broken test is a verify_error."""
    if not tests:
        return SandboxResult("verify_error", "problem has no tests", isolation())
    for index, test in enumerate(tests):
        fn_name = test.get("fn_name")
        try:
            want = json.loads(test["output"]) if fn_name is not None else None
        except ValueError as exc:
            return SandboxResult("verify_error", f"test {index + 1}: expected output is not JSON: {exc}", isolation())
        result, stdout = run_once(code, test["input"], timeout_s=timeout_s, fn_name=fn_name)
        if result.reason != "ok":
            return SandboxResult(result.reason, f"test {index + 1}: {result.detail}", result.isolation)
        diff = compare_call(want, stdout) if fn_name is not None else compare(test["output"], stdout)
        if diff is not None:
            return SandboxResult("wrong_answer", f"test {index + 1}: {diff}", result.isolation)
    return SandboxResult("ok", f"{len(tests)} test(s) passed", isolation())
