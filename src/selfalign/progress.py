"""Progress bars for long loops: items done, ETA and, where tokens are produced, tokens per second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Progress goes to stderr so that stdout stays clean for results and pipes.
console = Console(stderr=True)


class ProgressBar:
    def __init__(self, progress: Progress | None, task_id: int | None, unit: str) -> None:
        self._progress = progress
        self._task_id = task_id
        self._unit = unit
        self._tokens = 0
        self._started = time.perf_counter()

    @property
    def tokens(self) -> int:
        return self._tokens

    def advance(self, items: int = 1, tokens: int = 0) -> None:
        self._tokens += tokens
        if self._progress is None or self._task_id is None:
            return
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = f"{self._tokens / elapsed:,.0f} {self._unit}/s" if self._tokens else ""
        self._progress.update(self._task_id, advance=items, rate=rate)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "tok") -> Iterator[ProgressBar]:
    if not enabled or total == 0:
        yield ProgressBar(None, None, unit)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, rate="")
        yield ProgressBar(progress, task_id, unit)
