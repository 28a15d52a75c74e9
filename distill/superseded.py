"""Superseded stage outputs: a re-run moves the previous finished output aside instead of deleting it.

A mistyped value re-runs a stage; the output it replaces (days of teacher traces, a trained model) is moved, by one
rename on the same filesystem, to

    runs/<name>/.superseded/<stage>-<key>/

where `<key>` is `fingerprint(section_hash, input_hash)`: the first 12 hex digits of the hash of the manifest's two
fingerprint fields, the same key that names the stage's `.work/<stage>-<key>/` folder. When a stage is about to run
with a fingerprint whose superseded output is still there (full section and input hashes equal, files matching the
manifest's `output_hash`), the runner renames it back instead of running: a cache hit that costs two renames.
One slot per key: a later output with the same fingerprint (a `--force` re-run) replaces the earlier one.

Only finished stage directories (those with a manifest) are ever moved here; `.work/` (partial runs, eval's merge
scratch) never is. Names starting with a dot (the lock, `.trash-*` folders of an interrupted removal) are not
outputs. `distill gc` lists and removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distill import files
from distill.errors import DistillError
from distill.manifest import Manifest, canonical_hash, read_manifest

log = logging.getLogger(__name__)
SUPERSEDED = ".superseded"
TRASH = ".trash-"


def fingerprint(section_hash: str, input_hash: str) -> str:
    """The short key of a stage output: what the runner compares to call a stage cached, hashed to 12 digits."""
    return canonical_hash([section_hash, input_hash])[:12]


def slot(run_dir: Path, stage: str, key: str) -> Path:
    return run_dir / SUPERSEDED / f"{stage}-{key}"


@dataclass(frozen=True)
class Entry:
    """One superseded output as `distill gc` and `distill status` show it."""

    path: Path
    manifest: Manifest
    size: int  # bytes of its files

    @property
    def stage(self) -> str:
        return self.manifest.stage

    @property
    def key(self) -> str:
        return fingerprint(self.manifest.section_hash, self.manifest.input_hash)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Serialise moves in and out of `.superseded/`: parallel shard jobs of one run may finish or restore at once."""
    (run_dir / SUPERSEDED).mkdir(parents=True, exist_ok=True)
    with (run_dir / SUPERSEDED / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _discard(path: Path) -> None:
    """Rename to a dot-name first, so a kill during the delete never leaves a half-deleted folder that looks real."""
    trash = path.with_name(f"{TRASH}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def move_aside(run_dir: Path, out_dir: Path) -> Path | None:
    """Move the finished output `out_dir` to its slot (caller holds the lock). A folder without a manifest is not a
    finished output (nothing can address it again) and is deleted as before."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        shutil.rmtree(out_dir)
        return None
    target = slot(run_dir, manifest.stage, fingerprint(manifest.section_hash, manifest.input_hash))
    if target.exists():
        _discard(target)
    os.replace(out_dir, target)
    log.info("%s: previous output moved aside to %s (`distill gc` lists and removes it)", manifest.stage, target)
    return target


def swap_in(run_dir: Path, work_dir: Path, out_dir: Path) -> None:
    """Replace out_dir by the finished work_dir; the previous output goes to `.superseded/`, never away."""
    with locked(run_dir):
        if not work_dir.is_dir():
            return  # another job of this run (the other shard that finished last) swapped it in already
        if out_dir.exists():
            move_aside(run_dir, out_dir)
        os.replace(work_dir, out_dir)


def restore(run_dir: Path, stage: str, section_hash: str, input_hash: str) -> Manifest | None:
    """Put back the superseded output with exactly this fingerprint, moving the current one aside in turn; None when
    there is none, or its files no longer match its manifest (then the stage runs as usual)."""
    candidate = slot(run_dir, stage, fingerprint(section_hash, input_hash))
    if not (candidate / "manifest.json").is_file():
        return None
    out_dir = run_dir / stage
    wanted = (stage, section_hash, input_hash)
    with locked(run_dir):
        current = read_manifest(out_dir)
        if current and (current.stage, current.section_hash, current.input_hash) == wanted:
            return current  # another job of this run (a parallel shard) restored it a moment ago
        manifest = read_manifest(candidate)
        if manifest is None or (manifest.stage, manifest.section_hash, manifest.input_hash) != wanted:
            return None
        if files.sha256_tree(candidate) != manifest.output_hash:
            log.warning("%s: %s no longer matches its manifest's output hash; not restoring it", stage, candidate)
            return None
        if out_dir.exists():
            move_aside(run_dir, out_dir)
        os.replace(candidate, out_dir)
    log.info(
        "%s: cache hit, restored the superseded output %s (section %s, input %s, finished %s)",
        stage,
        candidate.name,
        section_hash[:12],
        input_hash[:12],
        manifest.finished_at,
    )
    return manifest


def tree_size(root: Path) -> int:
    return sum((Path(top) / name).lstat().st_size for top, _, names in os.walk(root) for name in names)


def entries(run_dir: Path) -> list[Entry]:
    """The run's superseded outputs, newest finished first. A folder there without a manifest is an error naming it
    (nothing this runner wrote), not something to skip or delete silently."""
    root = run_dir / SUPERSEDED
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest is None:
            raise DistillError(f"{path}: not a superseded stage output (no manifest.json); move it out of {root}")
        found.append(Entry(path, manifest, tree_size(path)))
    return sorted(found, key=lambda e: e.manifest.finished_at, reverse=True)


def summary(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Count and total bytes of superseded outputs per stage."""
    totals: dict[str, tuple[int, int]] = {}
    for entry in entries(run_dir):
        count, size = totals.get(entry.stage, (0, 0))
        totals[entry.stage] = (count + 1, size + entry.size)
    return totals


def remove(run_dir: Path, *, keep: int = 0) -> list[Entry]:
    """Delete the superseded outputs, all but the newest `keep` per stage (by finish time); returns those deleted.
    Leftovers of an interrupted removal go too."""
    if keep < 0:
        raise DistillError(f"--keep {keep}: expected 0 or more outputs to keep per stage")
    removed: list[Entry] = []
    with locked(run_dir):
        kept: dict[str, int] = {}
        for entry in entries(run_dir):
            kept[entry.stage] = kept.get(entry.stage, 0) + 1
            if kept[entry.stage] > keep:
                _discard(entry.path)
                removed.append(entry)
        for leftover in (run_dir / SUPERSEDED).glob(f"{TRASH}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


def human(size: int) -> str:
    """Bytes as a short decimal size: 812 B, 4.1 kB, 13.2 GB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
