"""Output for people on a terminal, and for pipes and log files: there, lines never wrap and tables
are aligned columns without box characters or colours, so a path or an id is never cut in two."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 10_000  # wide enough that no table row wraps


def make_console() -> Console:
    console = Console()
    console.soft_wrap = not console.is_terminal
    return console


def print_table(console: Console, table: Table) -> None:
    if console.is_terminal:
        console.print(table)
        return
    table.box = None
    table.pad_edge = False
    for column in table.columns:
        column.no_wrap = True
        column.overflow = "ignore"
    Console(file=console.file, width=PIPED_WIDTH, color_system=None, highlight=False).print(table)
