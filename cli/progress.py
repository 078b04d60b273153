"""Progress bars for long work (training, builds): one rich bar per stage, with the latest loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

Update = Callable[[int, float | None], None]


@contextmanager
def stage_bars(console: Console | None = None) -> Iterator[Callable[[str, int], Update]]:
    """Yields `stage(description, total)`, which adds a bar and returns `update(done, loss or None)`."""
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), "{task.fields[loss]}",
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bars:
        def stage(description: str, total: int) -> Update:
            task = bars.add_task(description, total=total, loss="")

            def update(done: int, loss: float | None = None) -> None:
                bars.update(task, completed=done, loss=f"loss {loss:.4f}" if loss is not None else "")
            return update
        yield stage
