"""The sandbox tried as an attacker would: forged verdicts, host files, secrets in the environment, and what happens
when the isolation a recipe asks for is missing (issue: code verification secure by default).

Forging programs run in every mode (the result channel does not depend on the isolation); the file-system test
runs in the modes that claim to keep the host's files untouched. Like the other sandbox tests these need
bubblewrap and fail rather than skip without it."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from distill import cli, files, hub_cards
from distill.filter import isolation, sandbox
from distill.filter.isolation import SandboxUnavailable
from test_filter_stage import recipe, run_filter, think, trace

ALL_MODES = ["bwrap", "unshare", "rlimits"]
CALL = {"input": "[[1, 2], 4]", "output": "7", "fn_name": "add"}  # add([1, 2], 4) == 7
WRONG = "def add(xs, k):\n    return 0\n"
MARKER = repr(sandbox.RESULT_MARKER)
FORGERIES = {
    "marker_then_early_exit": (
        f"import os, sys\nsys.stdout.write('\\n' + {MARKER} + '7\\n'); sys.stdout.flush(); os._exit(0)\n{WRONG}"
    ),
    "marker_with_guessed_secret": (
        f"import os, secrets\nline = '\\n' + {MARKER} + secrets.token_hex(16) + ':7\\n'\n"
        f"os.write(1, line.encode()); os._exit(0)\n{WRONG}"
    ),
    "sys_exit_at_import": f"import sys\nprint({MARKER} + '7')\nsys.exit(0)\n{WRONG}",
    "every_open_fd": (
        f"import os\nfor fd in range(256):\n    for secret in ('', '0' * 32):\n        try:\n"
        f"            os.write(fd, ('\\n' + {MARKER} + secret + ':7\\n').encode())\n        except OSError:\n"
        f"            pass\nos._exit(0)\n{WRONG}"
    ),
    "reads_its_source_and_stdin": (  # echoes every line that carries the marker, from every file it can find
        "import os, sys\nseen = sys.stdin.read()\nfor name in os.listdir('.'):\n    try:\n"
        "        seen += open(name, errors='replace').read()\n    except OSError:\n        pass\n"
        "for name in ('cmdline', 'environ'):\n    seen += open('/proc/self/' + name).read().replace('\\0', '\\n')\n"
        f"for line in seen.split('\\n'):\n    if {MARKER} in line:\n"
        "        os.write(1, ('\\n' + line + '7\\n').encode())\n"
        f"os._exit(0)\n{WRONG}"
    ),
    "replaces_json_dumps": f"import json\njson.dumps = lambda *args, **kwargs: '7'\n{WRONG}",
}


@pytest.fixture(scope="module", autouse=True)
def _bwrap() -> None:
    assert isolation.problem("bwrap") is None, (
        "bubblewrap is required for the sandbox tests: apt-get install bubblewrap"
    )


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sandbox_the_honest_function_passes_in_every_mode(mode: str) -> None:
    result = sandbox.run_tests("def add(xs, k):\n    return sum(xs) + k\n", [CALL], timeout_s=5, mode=mode)
    assert (result.reason, result.isolation) == ("ok", mode)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_sandbox_a_forged_call_result_is_rejected(name: str, mode: str) -> None:
    result = sandbox.run_tests(FORGERIES[name], [CALL], timeout_s=5, mode=mode)
    assert result.reason in ("wrong_answer", "runtime_error"), result
    if name != "replaces_json_dumps":  # that one is called and returns 0: an honest wrong answer
        assert "not called by the harness" in result.detail


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sandbox_stdout_is_the_only_stream_compared(mode: str) -> None:
    """The expected output written anywhere but the program's own stdout does not count, and stdout cannot be
    rewritten after the fact (it is a pipe: no seek, no truncate, no file to reopen by name)."""
    test = {"input": "3 4\n", "output": "7\n"}
    attempts = [
        "import sys\nsys.stderr.write('7\\n')\n",
        "open('.out', 'w').write('7\\n')\nopen('stdout.txt', 'w').write('7\\n')\nprint('wrong')\n",
        "import os\nprint('wrong', flush=True)\ntry:\n    os.lseek(1, 0, 0); os.ftruncate(1, 0)\nexcept OSError:\n"
        "    pass\nos.write(1, b'')\n",
    ]
    for code in attempts:
        assert sandbox.run_tests(code, [test], timeout_s=5, mode=mode).reason != "ok", code


def test_sandbox_output_over_the_cap_stops_the_program() -> None:
    result = sandbox.run_tests(
        "while True:\n    print('x' * 4096)\n", [{"input": "", "output": ""}], timeout_s=10, mode="bwrap"
    )
    assert (result.reason, "output over 16 MiB" in result.detail) == ("runtime_error", True)


@pytest.fixture()
def world_writable() -> Path:
    """A directory anyone may write to, as /tmp itself is (a write there as nobody succeeds on the host)."""
    folder = Path(tempfile.mkdtemp(prefix="distill-world-writable-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("mode", ["bwrap", "unshare"])
def test_sandbox_leaves_host_files_untouched(mode: str, world_writable: Path) -> None:
    if mode == "unshare" and os.geteuid() != 0:
        pytest.skip("unshare confines writes only as root (the program runs as nobody); as a user it can write")
    token = secrets.token_hex(4)
    dirs = [Path(d) for d in isolation.PRIVATE_TMP if Path(d).is_dir()]
    dirs += [world_writable, Path(os.environ.get("HOME", "/root")), Path.cwd()]
    targets = [d / f"escaped-{token}" for d in dirs]
    code = (
        f"import os\nfor path in {[str(t) for t in targets]!r}:\n    try:\n        open(path, 'w').write('x')\n"
        "    except OSError:\n        pass\nopen('own-dir', 'w').write('x')\nprint(open('own-dir').read())\n"
    )
    try:
        result = sandbox.run_tests(code, [{"input": "", "output": "x"}], timeout_s=5, mode=mode)
        assert result.reason == "ok", result  # its own directory is writable
        assert [t for t in targets if t.exists()] == []
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_sandbox_rlimits_mode_does_not_claim_to_hide_files(world_writable: Path) -> None:
    """The control for the test above: the same write succeeds under `rlimits`, which is why it warns."""
    target = world_writable / "escaped"
    code = f"open({str(target)!r}, 'w').write('x')\n"
    assert sandbox.run_tests(code, [{"input": "", "output": ""}], timeout_s=5, mode="rlimits").reason == "ok"
    assert target.exists()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sandbox_hides_tokens_and_keys(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {
        name: f"secret-{name}-{secrets.token_hex(8)}" for name in ("HF_TOKEN", "OPENAI_API_KEY", "DEEPSEEK_API_KEY")
    }
    for key, value in keys.items():
        monkeypatch.setenv(key, value)
    code = "import json, os, tempfile\nprint(json.dumps([dict(os.environ), tempfile.gettempdir(), os.getcwd()]))\n"
    result, stdout, _ = sandbox.run_once(code, "", timeout_s=5, mode=mode)
    assert result.reason == "ok", result
    env, tmp, cwd = json.loads(stdout)
    shell = {"PWD", "OLDPWD", "SHLVL", "_"}  # set by bwrap or the shell that mounts, not taken from the parent
    assert set(isolation.environment(cwd)) <= set(env) <= set(isolation.environment(cwd)) | shell, env
    assert not any(value in stdout for value in keys.values())
    assert tmp == cwd == env["HOME"], "temp files and HOME point at the test's own directory"


def _hide_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH without bwrap: every other tool of /usr/bin and /bin stays reachable through symlinks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            if tool.name != "bwrap" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    monkeypatch.setenv("PATH", str(bin_dir))
    isolation.problem.cache_clear()  # probed again without bwrap; cleared again after the test


@pytest.fixture()
def no_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _hide_bwrap(tmp_path, monkeypatch)
    yield
    isolation.problem.cache_clear()


def test_sandbox_missing_bwrap_is_one_clear_error(no_bwrap: None) -> None:
    with pytest.raises(SandboxUnavailable) as error:
        isolation.require("bwrap")
    message = str(error.value)
    for needle in (
        "`bwrap` is not on PATH",
        "none was run",
        "apt-get install bubblewrap",
        "dnf install bubblewrap",
        "macOS",
        "sandbox: unshare",
    ):
        assert needle in message, needle


def _code_rows(marker: Path) -> list[dict]:
    """One code trace whose program leaves `marker` behind if it ever runs with the host's files visible."""
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nprint(input())\n"
    tests = [{"input": "hi\n", "output": "hi\n"}]
    return [trace("echo", None, think("r", f"```python\n{code}```"), kind="code", tests=tests)]


def test_filter_stage_without_bwrap_stops_before_any_code_runs(
    tmp_path: Path, no_bwrap: None, world_writable: Path
) -> None:
    marker = world_writable / "ran"
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_filter(tmp_path, _code_rows(marker))
    assert not marker.exists(), "no model code ran"
    assert not (tmp_path / "runs" / "t" / "filter" / "kept.jsonl").exists(), "nothing half-written"


def test_filter_stage_math_only_needs_no_bwrap(tmp_path: Path, no_bwrap: None) -> None:
    manifest, _ = run_filter(tmp_path, [trace("1+1", "2", think("r", "\\boxed{2}"))])
    assert manifest.counts["out"] == 1 and "sandbox" not in manifest.extra


def test_filter_stage_opt_in_to_unshare_works_warns_and_is_named(
    tmp_path: Path, no_bwrap: None, caplog: pytest.LogCaptureFixture
) -> None:
    marker = Path("written-in-its-own-dir")
    with caplog.at_level(logging.WARNING, logger="distill"):
        manifest, out = run_filter(tmp_path, _code_rows(marker), sandbox="unshare")
    assert manifest.counts["out"] == 1 and manifest.extra["sandbox"] == "unshare"
    warnings = [r.getMessage() for r in caplog.records if "SANDBOX" in r.getMessage()]
    assert len(warnings) == 1 and "'unshare'" in warnings[0], "one loud warning per stage"
    funnel = (out / "funnel.md").read_text()
    assert "weaker sandbox `unshare`" in funnel
    config = recipe(sandbox="unshare")
    card = hub_cards.dataset_card(config, out, rows=1, facts=hub_cards.lineage(config, tmp_path / "runs" / "t"))
    assert "weaker sandbox `unshare`" in card


def test_verify_command_without_bwrap_exits_non_zero_and_writes_nothing(
    tmp_path: Path, no_bwrap: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"tests": json.dumps([{"input": "2\n", "output": "2\n"}]), "out": think("r", "```python\nprint(2)\n```")}]
    files.write_jsonl(tmp_path / "code.jsonl", rows)
    args = [
        "verify",
        str(tmp_path / "code.jsonl"),
        "--answer-field",
        "tests",
        "--response-field",
        "out",
        "--kind",
        "code",
        "--output",
        str(tmp_path / "out.jsonl"),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert cli.main(args) != 0
    assert "apt-get install bubblewrap" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    assert cli.main([*args, "--sandbox", "unshare"]) == 0
    assert [r["verdict"]["reason"] for r in files.read_jsonl(tmp_path / "out.jsonl")] == ["ok"]


NON_ROOT = """
from distill.filter import isolation, sandbox
escape = {escape!r}
for mode in ("bwrap", "unshare", "rlimits"):
    assert isolation.problem(mode) is None, (mode, isolation.problem(mode))
    ok = sandbox.run_tests("print(input())", [{{"input": "hi", "output": "hi"}}], timeout_s=5, mode=mode)
    code = f"open({{escape!r}}, 'w').write('x')"
    sandbox.run_tests(code, [{{"input": "", "output": ""}}], timeout_s=5, mode=mode)
    import os
    print(mode, ok.reason, os.path.exists(escape))
    if os.path.exists(escape):
        os.unlink(escape)
"""


def test_sandbox_modes_work_for_a_user_who_is_not_root(world_writable: Path) -> None:
    """As root the sandbox drops to nobody itself; a user runs bwrap and `unshare` in a user namespace instead.
    Run as nobody (system python3, this checkout on its path): `bwrap` and `unshare` keep the shared directory
    untouched, `rlimits` does not."""
    repo = Path(__file__).resolve().parents[1]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to become another user) and setpriv")
    if not os.access(isolation.interpreter(), os.X_OK) or (os.stat(repo).st_mode & 0o005) != 0o005:
        pytest.skip(f"{repo} is not readable by other users")
    script = NON_ROOT.format(escape=str(world_writable / "escaped"))
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", isolation.interpreter(), "-c", script]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "HOME": str(world_writable)}
    done = subprocess.run(drop, capture_output=True, text=True, cwd=world_writable, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["bwrap ok False", "unshare ok False", "rlimits ok True"]
