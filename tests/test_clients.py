"""The broker clients' retry rules, without a broker: what a long-running service reports and when it
gives up waiting."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from stylestream.streams import clients
from stylestream.streams.broker_process import free_port


def test_with_backoff_reports_each_retry_and_gives_up_at_its_deadline():
    def unreachable():
        raise clients.BrokerUnreachable("nobody home")

    retries: list[float] = []
    start = time.monotonic()
    got = clients.with_backoff(unreachable, threading.Event(), lambda e, delay: retries.append(delay),
                               until=start + 1.2)
    assert got is None and 1.2 <= time.monotonic() - start < 2.5
    assert retries[:2] == [clients.RETRY_FIRST_S, 2 * clients.RETRY_FIRST_S]  # growing waits, each reported


def test_with_backoff_raises_what_waiting_cannot_fix_unless_told_to_retry_all():
    from kafka.errors import UnsupportedCodecError

    def codec():
        raise UnsupportedCodecError("snappy")

    with pytest.raises(UnsupportedCodecError):
        clients.with_backoff(codec, threading.Event())
    assert clients.with_backoff(codec, threading.Event(), retry_all=True, until=time.monotonic() + 0.3) is None


def test_quiet_probe_asks_only_after_a_quiet_spell_and_names_what_failed():
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        up = clients.QuietProbe(f"127.0.0.1:{listening.getsockname()[1]}", quiet_s=0)
        up.check()  # something accepts connections there
    finally:
        listening.close()
    down = clients.QuietProbe(f"127.0.0.1:{free_port()}", quiet_s=0)
    with pytest.raises(clients.BrokerUnreachable, match="no Kafka broker accepts connections"):
        down.check()
    patient = clients.QuietProbe(f"127.0.0.1:{free_port()}", quiet_s=60)
    patient.check()  # heard from within the last minute: nothing asked
