"""The CLI surface and the README's generated recipe reference."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from distill.reference import recipe_reference

COMMANDS = (
    "generate",
    "filter",
    "train",
    "eval",
    "push",
    "run",
    "status",
    "recipe",
    "verify",
    "merge",
    "tiny-model",
    "gc",
    "onpolicy",
    "sweep",
)


def distill(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_help_lists_every_command():
    proc = distill("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"    {command}" in proc.stdout, command


def test_cli_bad_shard_is_a_usage_error(tmp_path):
    proc = distill("generate", "r.yaml", "--shard", "3/3", cwd=tmp_path)
    assert proc.returncode == 2 and "expected i/N with 0 <= i < N" in proc.stderr


def test_readme_recipe_reference_is_generated_from_the_schema():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"
    assert start in readme and end in readme
    assert readme.split(start)[1].split(end)[0] == recipe_reference(), "run `make reference` to refresh the README"
