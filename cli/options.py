"""Options shared by the `stylestream` commands."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from stylestream.streams.clients import split_bootstrap

DEFAULT_DATA_DIR = Path("stylestream-data")


def host_ports(value: str) -> str:
    """`value` if it is host:port[,host:port...]; a usage error naming the bad part otherwise."""
    try:
        split_bootstrap(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return value


def usable_folder(path: Path) -> Path:
    """`path` if it is a folder, or could be made as one; a usage error otherwise."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not path.exists() and not os.access(existing, os.W_OK):
        raise typer.BadParameter(f"cannot create {path}: {existing} is not writable")
    return path


BootstrapServers = Annotated[str, typer.Option(
    "--bootstrap-servers", "-b", envvar="STYLESTREAM_BOOTSTRAP_SERVERS", callback=host_ports, metavar="HOST:PORT",
    help="Kafka bootstrap servers (host:port[,host:port]); `stylestream broker` prints a local one.")]
DataDir = Annotated[Path, typer.Option(
    "--data-dir", envvar="STYLESTREAM_DATA_DIR", callback=usable_folder, metavar="DIR",
    help="Where state, history, images and the tiny models live.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Show library logs (Beam, Kafka).")]


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


OutputFormat = Annotated[Format, typer.Option(
    "--format", "-f", metavar="table|csv|json", help="Readable table, or CSV / JSON for tools.")]
