"""`pip install .` as a user does it: the wheel carries the dataset specs and launcher configs, and the installed
`distill` finds them from a directory that is not the repository.

The wheel is built from a copy of the files git tracks (plus untracked, not ignored ones): that is what
`pip install git+...` builds, and setuptools' build/ folder in the checkout can hold stale files from older builds
that would hide a missing one. The fresh venv sees the project venv's packages through a `.pth` line (a
directory added that way has its own `.pth` files ignored, so the project's editable distill stays out of it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow  # 30-90 s on 2 cores: a wheel build, an install, three fresh `distill` processes

SHIPPED = {"datasets": "distill/_datasets", "recipes/accelerate": "distill/_accelerate"}
CODE = ("distill", "student", "teacher")


def _run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(command)} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _source_copy(dest: Path) -> list[str]:
    """The files a clone would hold, copied to `dest`; returns their paths relative to the repository."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO)
    names = [name for name in listed.split("\0") if name and (REPO / name).is_file()]
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return names


def _installed_venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel, with the project venv's packages (no network: --no-deps, --no-index)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path)
    (Path(purelib.strip()) / "project.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: never touch the project venv's editable distill, which this venv can see
    install = ["-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)]
    _run([str(python), *install], cwd=tmp_path)
    return venv


def test_packaging_wheel_ships_specs_and_launchers_and_runs_outside_the_repo(tmp_path: Path, tiny_model: Path) -> None:
    source, wheels, work = tmp_path / "source", tmp_path / "wheels", tmp_path / "work"
    for folder in (source, wheels, work):
        folder.mkdir()
    names = _source_copy(source)
    build = ["-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels)]
    _run([sys.executable, *build], cwd=source)
    (wheel,) = wheels.glob("distill-*.whl")
    content = set(zipfile.ZipFile(wheel).namelist())
    for folder, installed in SHIPPED.items():
        expected = {f"{installed}/{path.name}" for path in (REPO / folder).glob("*.yaml")}
        assert expected and expected <= content, f"{folder}: missing from the wheel: {sorted(expected - content)}"
    # pyproject.toml lists the packages (package-dir needs it): a new subpackage missing there is caught here
    modules = {name for name in names if name.endswith(".py") and name.split("/")[0] in CODE}
    assert modules <= content, f"missing from the wheel (add the package to pyproject.toml): {modules - content}"
    assert not any(name.startswith("datasets/") for name in content), "the wheel must never install a datasets package"

    venv = _installed_venv(tmp_path, wheel)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    probe = (
        "import json, datasets, distill; from distill.data import find_spec; from distill.errors import RecipeError; "
        "from student.launch import config_file\n"
        "try: find_spec('math5000')\nexcept RecipeError as exc: unknown = str(exc)\n"
        "print(json.dumps({'distill': distill.__file__, 'datasets': datasets.__file__, 'unknown': unknown, "
        "'spec': str(find_spec('gsm8k').resolve()), 'launcher': str(config_file('zero2').resolve())}))"
    )
    found = json.loads(_run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env))
    package = Path(found["distill"]).parent
    assert package.is_relative_to(venv), f"distill imported from {package}, not the installed wheel"
    assert not Path(found["datasets"]).is_relative_to(venv), "the Hugging Face datasets library is shadowed"
    assert found["spec"] == str(package / "_datasets" / "gsm8k.yaml")
    assert found["launcher"] == str(package / "_accelerate" / "zero2.yaml")
    assert "known specs: aime24, aime25, apps," in found["unknown"]

    recipe = {
        "name": "installed",
        "data": [{"spec": "math500", "limit": 4}],
        "eval": {"benchmarks": ["gsm8k"], "sampling": {"max_tokens": 256}},
        "student": {"model": str(tiny_model), "accelerate": "zero2"},
    }
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    distill = str(venv / "bin" / "distill")
    assert _run([distill, "recipe", "check", "r.yaml"], cwd=work, env=env).strip() == "r.yaml: ok"
    plan = json.loads(_run([distill, "recipe", "plan", "r.yaml", "--json"], cwd=work, env=env))
    assert "zero2 over 1 GPU(s)" in plan["student"]["memory_per_gpu"]["how"]  # read from the shipped config
