"""Test helpers for talking to the broker."""

from __future__ import annotations

from stylestream.schemas.events import encode_event
from stylestream.streams import clients


def produce(bootstrap_servers: str, topic: str, events) -> None:
    p = clients.producer(bootstrap_servers)
    for e in events:
        if isinstance(e, tuple):  # (key, raw bytes): for malformed input
            p.send(topic, key=e[0], value=e[1])
        else:
            p.send(topic, key=e.user_id.encode(), value=encode_event(e))
    p.flush()
    p.close()


def read_topic(bootstrap_servers: str, topic: str) -> list:
    """Every message on the topic, in partition then offset order."""
    c = clients.consumer(bootstrap_servers)
    try:
        tps = clients.partitions_of(c, topic)
        ends = clients.true_end_offsets(c, tps)
        return [m for tp in tps for m in clients.read_range(c, tp, 0, ends[tp])]
    finally:
        c.close()
