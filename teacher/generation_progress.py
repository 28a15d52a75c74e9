"""The generate stage's one progress bar: problems done/total, generated tokens/s, ETA, running API cost."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from teacher.traces import GenerationStats


class ProgressBar:
    """A rich bar when `enabled` (a TTY and no `--no-progress`), otherwise nothing at all."""

    def __init__(self, *, total: int, stats: GenerationStats, show_cost: bool, enabled: bool) -> None:
        self.stats = stats
        self.show_cost = show_cost
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [
                TextColumn("generate"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("problems"),
                TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(),
            ]
            if show_cost:
                columns.append(TextColumn("{task.fields[cost]}"))
            self.progress = Progress(*columns, console=Console(stderr=True))  # stdout stays clean for pipes
            self.task = self.progress.add_task("generate", total=total, speed="", cost="")

    def update(self) -> None:
        if self.progress is None:
            return
        self.progress.update(
            self.task,
            completed=self.stats.problems + sum(self.stats.skipped.values()),
            speed=f"{self.stats.tokens_per_s:,.0f} tok/s",
            cost=f"${self.stats.cost_usd:,.2f}",
        )

    @contextlib.contextmanager
    def shown(self) -> Iterator[ProgressBar]:
        if self.progress is None:
            yield self
            return
        with self.progress:
            yield self
            self.update()
