"""distill: turn a large reasoning model into small ones.

The package is the spine both heavy stages share: the recipe schema (`distill.recipe`), the record contract
(`distill.records`), stage manifests and fingerprints (`distill.manifest`), the stage runner (`distill.pipeline`)
and the CLI (`distill.cli`). Nothing here imports vLLM, torch or TRL at module level, so `distill recipe show`
and `distill status` start in well under a second.
"""

from distill.errors import DataError, DistillError, RecipeError

__version__ = "0.1.0"
__all__ = ["DataError", "DistillError", "RecipeError", "__version__"]
