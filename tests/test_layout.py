"""The layout contract: datasets/ never shadows `datasets`, stages never import each other, distill stays light."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

HEAVY = {"vllm", "torch", "trl", "peft", "transformers", "teacher", "student"}


def _top_level_imports(path) -> set[str]:
    """Root module names imported at module level (not inside functions), ignoring `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _all_imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_datasets_folder_has_no_python_and_never_shadows_the_library():
    assert not (REPO / "datasets" / "__init__.py").exists(), "datasets/__init__.py would shadow the datasets library"
    assert not list((REPO / "datasets").rglob("*.py")), "datasets/ holds YAML specs and small data only"
    code = "import datasets, sys; print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    path, has_loader = out.split()
    assert "site-packages" in path and has_loader == "True", f"`import datasets` from the repo root gave {path}"


def test_teacher_and_student_never_import_each_other():
    for package, other in (("teacher", "student"), ("student", "teacher")):
        for path in (REPO / package).rglob("*.py"):
            assert other not in _all_imports(path), f"{path.relative_to(REPO)} imports {other}"


def test_distill_imports_no_heavy_library_at_module_level():
    for path in (REPO / "distill").rglob("*.py"):
        heavy = _top_level_imports(path) & HEAVY
        assert not heavy, f"{path.relative_to(REPO)} imports {sorted(heavy)} at module level (import lazily)"


def test_cli_starts_without_loading_heavy_libraries():
    code = (
        "import sys; from distill import cli, commands, pipeline, recipe, data;"
        "print(sorted(m for m in ('vllm', 'torch', 'trl', 'peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_source_file_over_400_lines():
    for folder in ("distill", "teacher", "student", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            assert lines <= 400, f"{path.relative_to(REPO)} has {lines} lines (limit 400): split it"
