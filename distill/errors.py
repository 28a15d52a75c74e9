"""The error types the CLI turns into one clear message and a non-zero exit code (no traceback)."""


class DistillError(ValueError):
    """Bad input that the user can fix; the message names the file, key or record and what was expected."""


class RecipeError(DistillError):
    """A recipe or dataset spec is invalid: unknown key, wrong type, missing file, bad override."""


class DataError(DistillError):
    """A data file is unreadable or does not match its spec (file:line, or the missing column)."""
