"""How model-written code is isolated from this machine: the three `filter.sandbox` modes, and the check that the
chosen one works before any code runs.

- `bwrap` (the default): bubblewrap builds new user/net/pid/ipc/uts namespaces with a read-only /usr, its own
  /proc, /dev and /tmp, and nothing of the host writable but the test's own directory: the program sees neither
  the network nor the machine's files. Linux only.
- `unshare`: util-linux `unshare` gives new net/mount/pid namespaces and private tmpfs over the world-writable
  directories (/tmp, /var/tmp, /dev/shm, /run/lock). The file system stays *readable*: a world-readable token file
  can be read. As root the program runs as nobody, so it can write only its own directory; as another user it
  can write wherever that user can.
- `rlimits`: resource limits and the wall timeout only; the network and file system are the user's.

Every mode runs the system `python3 -I -S` (standard library, no site-packages) with a scrubbed environment
(`PATH`, and `HOME`/`TMPDIR` pointing at the test's directory: no `HF_TOKEN`, no API keys), under CPU, memory,
file-size and process rlimits. When distill runs as root the code runs as uid/gid 65534 (nobody), because the
kernel exempts root from the process-count limit (a fork bomb as root spawned 30k processes in our probe).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from distill.errors import DistillError

Mode = Literal["bwrap", "unshare", "rlimits"]
MODES: tuple[Mode, ...] = ("bwrap", "unshare", "rlimits")
NOBODY = 65534
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable: a private tmpfs over each (unshare)
WEAKER = {
    "unshare": "no network, own pid namespace and private /tmp, but the machine's files stay readable",
    "rlimits": "resource limits only: the program can reach the network and read (and, unless distill runs as "
    "root, write) the user's files",
}
INSTALL = """\
Install bubblewrap (no sudo is needed to *use* it, only to install it):
  Debian/Ubuntu: sudo apt-get install bubblewrap
  Fedora/RHEL:   sudo dnf install bubblewrap
  Arch:          sudo pacman -S bubblewrap
bubblewrap is Linux-only: on macOS run the pipeline in a Linux container or VM (Docker Desktop, Colima, Lima)
with bubblewrap installed there. If bwrap is installed but cannot create namespaces (a container without
user namespaces, or `kernel.unprivileged_userns_clone=0`), allow user namespaces or run on the host.
Or opt into a weaker sandbox explicitly in the recipe, `filter: {{sandbox: unshare}}` or `rlimits`, knowing what
it leaves open:
  unshare: {unshare}
  rlimits: {rlimits}"""

log = logging.getLogger("distill")


class SandboxUnavailable(DistillError):
    """The recipe's `filter.sandbox` mode does not work on this machine; raised before any model code runs."""


def interpreter() -> str:
    """System python3 (readable by the unprivileged sandbox user), else the running interpreter."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def environment(workdir: str) -> dict[str, str]:
    """The whole environment the program gets: nothing of the parent's (tokens and keys stay out)."""
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _bwrap(workdir: Path) -> list[str]:
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    args += ["--ro-bind", "/usr", "/usr"]
    for link in ("lib", "lib64", "bin", "sbin"):
        if Path(f"/{link}").is_symlink():
            args += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        elif Path(f"/{link}").is_dir():
            args += ["--ro-bind", f"/{link}", f"/{link}"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(workdir), "/sandbox"]
    args += ["--chdir", "/sandbox", "--clearenv"]
    for key, value in environment("/sandbox").items():
        args += ["--setenv", key, value]
    return args


def _unshare() -> list[str]:
    """New net/mount/pid namespaces; a shell mounts the private tmpfs dirs, then (as root) drops to nobody. The
    test's directory is the working directory: still reachable through `.` once /tmp is covered, it is bound back
    at its own path (Python opens a script by its absolute path)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    mounts = " ".join(d for d in PRIVATE_TMP if Path(d).is_dir() and not Path(d).is_symlink())
    drop = 'exec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs -- "$@"'
    script = "PATH=/usr/sbin:/usr/bin:/sbin:/bin; w=$PWD; "
    script += f'for d in {mounts}; do mount -t tmpfs -o size=64m,mode=1777 tmpfs "$d" || exit 97; done; '
    script += 'mkdir -p "$w" && mount --no-canonicalize --bind . "$w" && cd "$w" || exit 97; '
    script += drop if os.geteuid() == 0 else 'exec "$@"'
    namespaces = ["--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
    return ["unshare", *user, *namespaces, "--", "/bin/sh", "-c", script, "sh"]


def command(mode: Mode, workdir: Path, args: list[str]) -> list[str]:
    """The argv that runs `python3 -I -S *args` under `mode`, with `workdir` as its directory."""
    inner = [interpreter(), "-I", "-S", *args]
    if mode == "bwrap":
        return [*_bwrap(workdir), *inner]
    if mode == "unshare":
        return [*_unshare(), *inner]
    return inner


def popen_user(mode: Mode) -> dict[str, int | list[int]]:
    """Popen arguments that drop root to nobody before exec (bwrap then builds an unprivileged user namespace;
    `unshare` needs root for its mounts and drops to nobody itself)."""
    if os.geteuid() != 0 or mode == "unshare":
        return {}
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def own(path: Path) -> None:
    """Give the test's directory to the user the code runs as."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


@functools.cache
def problem(mode: Mode) -> str | None:
    """Why `mode` does not work here (None when it does): its tool is missing, or a trivial program fails in it."""
    tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(mode)
    if tool is None:
        return None
    if shutil.which(tool) is None:
        return f"`{tool}` is not on PATH"
    if mode == "unshare" and os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "`setpriv` (util-linux) is not on PATH"
    probe = Path(tempfile.mkdtemp(prefix="distill-probe-"))
    try:
        own(probe)
        done = subprocess.run(
            command(mode, probe, ["-c", "pass"]),
            capture_output=True,
            timeout=30,
            cwd=probe,
            env=environment(str(probe)),
            **popen_user(mode),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`{tool}` could not run: {exc}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if done.returncode != 0:
        return f"`{tool}` failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()[-300:]}"
    return None


def require(mode: Mode) -> Mode:
    """Check `mode` before a stage's first program runs: a clear error when it does not work, and one loud warning
    when it is weaker than bwrap (the caller calls this once per stage). Returns the mode, for the stage report."""
    if mode not in MODES:
        raise SandboxUnavailable(f"filter.sandbox: expected one of {', '.join(MODES)}, got {mode!r}")
    why = problem(mode)
    if why is not None:
        hint = INSTALL.format(**WEAKER) if mode == "bwrap" else f"Or choose another filter.sandbox: {MODES}."
        raise SandboxUnavailable(
            f"filter.sandbox is {mode!r}, but it does not work here: {why}. Model-written code would run on this "
            f"machine without the isolation the recipe asks for, so none was run.\n{hint}"
        )
    if mode in WEAKER:
        log.warning("SANDBOX: model-written code runs under filter.sandbox %r: %s", mode, WEAKER[mode])
    return mode


def main(argv: list[str] | None = None) -> int:
    """`python -m distill.filter.isolation [--install-hint]`: which modes work here and how to get bubblewrap
    (`--install-hint`, used by `make install`: only that, only when bwrap does not work). Always exits 0, so an
    install without bubblewrap still completes; the stage that needs it is the one that refuses."""
    hint_only = "--install-hint" in (sys.argv[1:] if argv is None else argv)
    for mode in () if hint_only else MODES:
        why = problem(mode)
        print(f"sandbox {mode:8s} {'works' if why is None else 'unavailable: ' + why}")
    if (why := problem("bwrap")) is not None:
        print(f"note: {why}: verifying model-written code (filter.sandbox: bwrap, the default) needs bubblewrap.")
        print(INSTALL.format(**WEAKER))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
