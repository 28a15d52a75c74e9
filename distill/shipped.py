"""Files distill ships beside its code and finds by name: dataset specs (`datasets/<name>.yaml`) and accelerate
launcher configs (`recipes/accelerate/<name>.yaml`).

Both folders stay at the top of the repository (`datasets/` must never become a package: it would shadow the
Hugging Face `datasets` library), so the wheel carries them as package data under other names, `distill/_datasets/`
and `distill/_accelerate/` (pyproject.toml, `package-dir`). A name resolves to the first file found in:

1. the path as given, then the current directory's `datasets/` or `recipes/accelerate/` (the user's own files,
   or a checkout run from its root);
2. the repository checkout this code was imported from (an editable install run from another directory);
3. the copy installed with the package (`pip install .`, `pip install git+...`).

2 and 3 never both exist: a checkout has no copy inside `distill/`, and an installed package's "checkout" is
site-packages, whose `datasets/` is the Hugging Face library, so it is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent


@dataclass(frozen=True)
class Shipped:
    """One kind of shipped file: its folder in the repository (and under the cwd) and in the installed package."""

    folder: str
    installed: str

    def folders(self) -> list[Path]:
        """The folders a name is looked up in, in order (see the module docstring); some may not exist."""
        installed = PACKAGE / self.installed
        return [Path(self.folder), installed if installed.is_dir() else CHECKOUT / self.folder]

    def find(self, name: str) -> Path | None:
        """`name` as a path (cwd-relative or absolute), else `<name>.yaml` in each folder; None when none is a file."""
        candidates = [Path(name), *(folder / f"{name}.yaml" for folder in self.folders())]
        return next((path for path in candidates if path.is_file()), None)

    def names(self) -> list[str]:
        """Every name `find` resolves, sorted: what an "unknown name" error lists."""
        return sorted({path.stem for folder in self.folders() if folder.is_dir() for path in folder.glob("*.yaml")})


SPECS = Shipped(folder="datasets", installed="_datasets")
LAUNCHERS = Shipped(folder="recipes/accelerate", installed="_accelerate")
