"""A broker process started on loopback: its handle, and waiting until it answers."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from stylestream.streams import clients

READY_TIMEOUT_S = 20.0


class BrokerError(RuntimeError):
    pass


def free_port(other_than: int | None = None) -> int:
    """A free port of 127.0.0.1 (not `other_than`: two picks in a row may return the same one once the
    first socket is closed). Port 0 would be advertised as 0 by Tansu, so pick a free port ourselves."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != other_than:
            return port


@dataclass
class LocalBroker:
    process: subprocess.Popen
    port: int
    engine: str  # "kafka" or "tansu"
    description: str  # what it is and where it keeps its data, for people to read
    # 0: SIGKILL at once (Tansu: SIGTERM takes seconds and holds the port, and it keeps nothing worth
    # flushing); more: SIGTERM and wait that long first (Kafka flushes its log and closes cleanly).
    stop_timeout_s: float = 0.0
    data_dir: Path | None = None  # where it keeps its log (None: in memory)
    remove_data_on_stop: bool = False  # a scratch folder made for this broker alone

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

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
        if self.remove_data_on_stop and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def wait_for_metadata(bootstrap_servers: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once the broker just started answers metadata; BrokerError after `timeout_s`."""
    clients.is_tansu.cache_clear()  # a new broker may answer on a port another engine used before
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            clients.require_broker(bootstrap_servers, timeout_s=5.0)
            return
        except clients.BrokerUnreachable as e:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker at {bootstrap_servers} does not answer metadata: {e}") from e
            time.sleep(0.05)


def die_with_parent() -> None:
    """In a child, before exec: SIGKILL it when the process that started it dies, so a killed
    `stylestream broker` leaves no broker holding the port or the log directory (Linux prctl).
    Linux sends it when the starting *thread* ends: start brokers from a thread that outlives them."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
