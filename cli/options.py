"""Options shared by the `stylestream` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_DATA_DIR = Path("stylestream-data")

BootstrapServers = Annotated[str, typer.Option(
    "--bootstrap-servers", "-b", envvar="STYLESTREAM_BOOTSTRAP_SERVERS",
    help="Kafka bootstrap servers (host:port[,host:port]); `stylestream broker` prints a local one.")]
DataDir = Annotated[Path, typer.Option(
    "--data-dir", envvar="STYLESTREAM_DATA_DIR", help="Where state, history, images and the tiny models live.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs (Beam, Kafka).")]
