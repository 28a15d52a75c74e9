"""One progress bar per long loop, owned by the entry point: a count and records/s (the total is unknown while
streaming). Off for `--no-progress` and non-TTY runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def records_progress(description: str, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,.0f} records"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=None, rate="")

        def advance(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:,.0f} records/s" if speed else "")

        yield advance
