"""Tables on the terminal, and plain when piped: a pipe or a log file gets aligned columns without box
characters, colours or wrapping, so a path or an id is never cut in two."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 10_000  # wide enough that no row wraps


def print_table(console: Console, table: Table) -> None:
    if console.is_terminal:
        console.print(table)
        return
    table.box = None
    table.pad_edge = False
    for column in table.columns:
        column.no_wrap = True
        column.overflow = "ignore"
    console.print(table, width=PIPED_WIDTH, crop=False, soft_wrap=True)
