"""Kafka clients configured for Apache Kafka, with Tansu's quirks handled where Tansu answers.

Records compressed with gzip, snappy, lz4 or zstd are read (python-snappy, lz4 and zstandard are
dependencies); the project's producers compress with STYLESTREAM_KAFKA_COMPRESSION (default zstd;
gzip, snappy, lz4 or none).

Each workaround sits behind `is_tansu` (see PLATFORM-NOTES): Tansu's idempotent producer breaks for
good after a broker restart, so it stays off there (on everywhere else); and Tansu reports the base
offset of the last batch + 1 as a partition's end, so `true_end_offsets` reads the last batch there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    UnknownTopicOrPartitionError,
    UnsupportedCodecError,
)
from kafka.producer.future import FutureRecordMetadata

from stylestream.streams.topics import MAX_MESSAGE_BYTES

POLL_MS = 500
# For consumers that read offsets known to exist: an empty fetch (a partition caught up) should not
# hold the next request back for Kafka's default 500 ms.
READ_FETCH_WAIT_MS = 10


# The Kafka header that carries a request's trace id from the API through serving to its result.
TRACE_HEADER = "trace-id"
BROKER_ERRORS = (KafkaError, TimeoutError, ConnectionError)
COMPRESSION_CODECS = ("zstd", "gzip", "snappy", "lz4", "none")
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 30.0
REACH_TIMEOUT_S = 3.0
T = TypeVar("T")


class BrokerUnreachable(ConnectionError):
    """No broker answers at the bootstrap servers; the message says which and why, for people."""


def split_bootstrap(value: str) -> list[tuple[str, int]]:
    """host:port[,host:port...] as (host, port) pairs; ValueError naming the part that is not one."""
    pairs = []
    for address in value.split(","):
        host, _, port = address.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address.strip()!r} is not host:port (for example 127.0.0.1:9092)")
        pairs.append((host.strip("[]"), int(port)))
    return pairs


def require_broker(bootstrap_servers: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Return once a broker answers a metadata request, or raise BrokerUnreachable within about
    `timeout_s` (an unresolvable host at once), rather than after a client's 30-s request timeout."""
    for host, _ in split_bootstrap(bootstrap_servers):
        try:
            socket.getaddrinfo(host, None)
        except OSError as e:
            raise BrokerUnreachable(f"cannot resolve the broker host {host!r} ({e.strerror})") from None
    try:
        KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000),
                         bootstrap_timeout_ms=int(timeout_s * 1000)).close()
    except KafkaError as e:
        raise BrokerUnreachable(f"no Kafka broker answers at {bootstrap_servers} ({type(e).__name__}); start "
                                "one with `stylestream broker` or check --bootstrap-servers") from None


class QuietProbe:
    """Whether a broker still accepts connections, asked once a consumer has heard nothing for `quiet_s`:
    kafka-python's poll returns nothing alike whether the topics are quiet or the broker is gone, and a
    service should report the second (`check` raises BrokerUnreachable, for `with_backoff` to report
    and retry). A plain TCP connection: a Kafka client would start an IO thread per try, which
    kafka-python leaves running when the broker is down."""

    def __init__(self, bootstrap_servers: str, quiet_s: float = 5.0):
        self._addresses, self._quiet_s = split_bootstrap(bootstrap_servers), quiet_s
        self._heard = time.monotonic()

    def heard(self) -> None:
        self._heard = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self._heard < self._quiet_s:
            return
        errors = []
        for address in self._addresses:
            try:
                socket.create_connection(address, timeout=REACH_TIMEOUT_S).close()
            except OSError as e:
                errors.append(f"{address[0]}:{address[1]}: {e.strerror or type(e).__name__}")
                continue
            self.heard()
            return
        raise BrokerUnreachable(f"no Kafka broker accepts connections ({'; '.join(errors)})")


def cause(e: BaseException) -> BaseException:
    """The error behind kafka-python's "a previous request has failed" (it carries the original)."""
    inner = [a for a in getattr(e, "args", ()) if isinstance(a, KafkaError)]
    return cause(inner[0]) if type(e) is KafkaError and inner else e


def retriable(e: BaseException) -> bool:
    """Whether waiting can fix it: a broker that cannot be reached or cannot answer yet. A codec this
    installation cannot read, a missing authorization, a record too large or a topic that does not
    exist cannot be waited out."""
    e = cause(e)
    if isinstance(e, UnknownTopicOrPartitionError):
        return False
    if isinstance(e, KafkaError):
        return bool(e.retriable)
    return isinstance(e, TimeoutError | ConnectionError)


def describe(e: BaseException) -> str:
    """One line for people: what went wrong with the broker, and whether waiting helps."""
    e = cause(e)
    if isinstance(e, BrokerUnreachable):
        return str(e)
    if isinstance(e, UnsupportedCodecError):
        return (f"records are compressed with a codec this installation cannot read ({e}); install "
                "stylestream's dependencies (python-snappy, lz4, zstandard)")
    if isinstance(e, ProducerFencedError):
        return ("another ingestor took over this state's Kafka transactions (it runs on a copy of the same "
                "state): stop one of them")
    if retriable(e):
        return f"broker unavailable ({type(e).__name__}: {e})"
    return f"the broker refused or could not be read ({type(e).__name__}: {e}); waiting will not fix it"


def with_backoff(fn: Callable[[], T], stop: threading.Event,
                 on_retry: Callable[[Exception, float], None] | None = None, retry_all: bool = False,
                 until: float | None = None) -> T | None:
    """fn(), with broker errors retried after exponentially growing waits; None if `stop` is set first,
    or once the `until` deadline (time.monotonic()) has passed with fn still failing.
    Errors that waiting cannot fix (`retriable`) are raised, unless `retry_all` (a long-running
    service, which reports each through `on_retry` and tries again); a fenced producer always is."""
    delay = RETRY_FIRST_S
    while not stop.is_set():
        try:
            return fn()
        except BROKER_ERRORS as e:
            if not (retriable(e) or (retry_all and not isinstance(cause(e), ProducerFencedError))):
                raise  # a fenced producer stops even a long-running service: another one took over
            if on_retry:
                on_retry(e, delay)
        # Waited outside the `except` block: a Ctrl-C a library swallowed in fn() then shows as a command
        # carrying on (cli/main.py sends it again).
        if until is not None and time.monotonic() >= until:
            return None
        stop.wait(delay if until is None else min(delay, until - time.monotonic()))
        delay = min(2 * delay, RETRY_MAX_S)
    return None


@functools.cache
def is_tansu(bootstrap_servers: str) -> bool:
    """Whether Tansu answers at `bootstrap_servers`: it names itself only by its cluster id."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        return str(admin.describe_cluster().get("cluster_id", "")).startswith("tansu")
    finally:
        admin.close()


# kafka-python backs reconnects off up to 30 s, so after an outage a client could stay away that
# much longer than the broker; the Java client's 1 s brings every client back within a second.
RECONNECT_BACKOFF_MAX_MS = 1000


def compression() -> str | None:
    """The codec the project's producers use: STYLESTREAM_KAFKA_COMPRESSION, zstd by default."""
    codec = os.environ.get("STYLESTREAM_KAFKA_COMPRESSION", "zstd").strip().lower()
    if codec not in COMPRESSION_CODECS:
        raise ValueError(f"STYLESTREAM_KAFKA_COMPRESSION={codec!r}: choose one of {', '.join(COMPRESSION_CODECS)}")
    return None if codec == "none" else codec


def producer(bootstrap_servers: str, **overrides) -> KafkaProducer:
    """A producer for the project's topics: every acknowledgement, idempotent where the broker allows,
    compressed (`compression`), and requests as large as the largest message a topic takes (a style
    manifest)."""
    config = dict(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5, retries=5,
                  compression_type=compression(),
                  enable_idempotence=not is_tansu(bootstrap_servers),
                  reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS, max_request_size=MAX_MESSAGE_BYTES)
    config.update(overrides)
    return KafkaProducer(**config)


Send = Callable[[str, bytes | None, bytes | None], None]


def acknowledged(producer: KafkaProducer, sent: Iterable[FutureRecordMetadata], timeout_s: float | None = None,
                 ) -> None:
    """Flush (waiting at most `timeout_s`), then raise the error of the first send that failed:
    kafka-python's flush() returns even when a record failed (a just-created topic without a leader
    yet, a record too large), which would lose it without a word."""
    producer.flush(timeout=timeout_s)
    for future in sent:
        future.get(timeout=timeout_s)


@contextlib.contextmanager
def sending(producer: KafkaProducer, transactional: bool, timeout_s: float | None = None) -> Iterator[Send]:
    """A `send(topic, key, value)` whose messages all go out or none do: in one Kafka transaction where
    `transactional` (the producer has a transactional.id and ran init_transactions), and every send
    checked either way. An error (a record the broker refused, a fenced producer, no acknowledgement
    within `timeout_s`) is raised; the caller then closes the producer, and the next one's
    init_transactions aborts what was left open (kafka-python's abort_transaction would wait for a
    broker that may be gone). The timeout matters on a cluster: kafka-python keeps asking a
    transaction coordinator that died, where a new producer finds the one that took over."""
    sent = []
    if transactional:
        producer.begin_transaction()
    yield lambda topic, key, value: sent.append(producer.send(topic, key=key, value=value))
    acknowledged(producer, sent, timeout_s)
    if transactional:
        producer.commit_transaction()


def discard(producer: KafkaProducer, timeout_s: float = 1.0) -> None:
    """Closes a producer whose sends failed, waiting about `timeout_s` for what it still holds, then
    dropping it (never acknowledged: the caller sends it again). kafka-python's close() flushes first
    and, when the broker is gone, raises on the flush's timeout and leaves the producer open, its
    network thread retrying until the process ends: one more thread per failed try of an outage.
    The forced close's second close() waits `timeout_s` again; a transactional producer whose broker
    hangs (rather than refuses connections) may hold its sender up to `request_timeout_ms`, and then
    that close raises too, the thread ending by itself once that timeout passes."""
    try:
        producer.close(timeout=timeout_s)
    except KafkaTimeoutError:
        # kafka-python has no public way to drop unsent records: its sender fails them on a forced close
        producer._sender.force_close()
        producer.close(timeout=timeout_s)


def send_all(bootstrap_servers: str, messages: Iterable[tuple[str, bytes, bytes]]) -> None:
    """(topic, key, value) messages, in order, acknowledged before it returns. Retriable errors are
    retried until kafka-python's delivery timeout (2 min), not 5 times: a topic created a moment
    ago may answer NotLeaderForPartition for longer than 5 quick retries on a busy machine."""
    p = producer(bootstrap_servers, linger_ms=20, batch_size=256 * 1024, retries=float("inf"))
    try:
        acknowledged(p, [p.send(topic, key=key, value=value) for topic, key, value in messages])
    finally:
        p.close()


def consumer(bootstrap_servers: str, group_id: str | None = None, **overrides) -> KafkaConsumer:
    # A 6 s session: a worker that dies hands its partitions on within seconds, not Kafka's default
    # 45 s (and Tansu answers JoinGroup only after half the session timeout).
    # read_committed: what a transactional producer (the Flink job) aborted is never read. Tansu
    # has no transactions.
    config = dict(bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False,
                  auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=2000,
                  max_poll_records=500, reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                  isolation_level="read_uncommitted" if is_tansu(bootstrap_servers) else "read_committed")
    config.update(overrides)
    return KafkaConsumer(**config)


def partitions_of(c: KafkaConsumer, topic: str) -> list[TopicPartition]:
    parts = c.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(parts or ())]


def true_end_offsets(c: KafkaConsumer, tps: Iterable[TopicPartition], timeout_s: float = 30.0,
                     known: dict[TopicPartition, tuple[int, int]] | None = None,
                     reader: KafkaConsumer | None = None) -> dict[TopicPartition, int]:
    """The offset after the last message of each partition.

    Kafka reports it. Tansu's reported end may point inside the last batch, so there `reader`
    (default `c`; it gets assigned to the partitions) reads the last batch: the end is known once a
    record of it has arrived, since a fetch returns a batch whole. A caller that asks often should
    pass a `reader` of its own: a fetch in flight on `c` holds up its ListOffsets request for up to
    fetch_max_wait_ms, and then kafka-python (3.0.12) sometimes leaves a partition out of the answer
    (a KeyError). `known` (partition -> (reported, true end)) is kept up to date and spares the read
    where the reported end is unchanged.
    """
    tps = list(tps)
    if not tps:
        return {}
    if not is_tansu(c.config["bootstrap_servers"]):
        return c.end_offsets(tps)
    known = {} if known is None else known
    reader = reader or c
    reported = c.end_offsets(tps)
    ends = {tp: known[tp][1] if tp in known and known[tp][0] == reported[tp] else reported[tp] for tp in tps}
    waiting = {tp for tp in tps if reported[tp] > 0 and known.get(tp, (None,))[0] != reported[tp]}
    reader.assign(sorted(waiting))
    for tp in waiting:
        reader.seek(tp, reported[tp] - 1)
    deadline = time.monotonic() + timeout_s
    while waiting:
        for tp, records in reader.poll(timeout_ms=POLL_MS).items():
            ends[tp] = max(ends[tp], records[-1].offset + 1)
            waiting.discard(tp)
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"could not read the last batch of {sorted(waiting)} within {timeout_s} s")
    reader.assign([])
    known.update({tp: (reported[tp], ends[tp]) for tp in tps})
    return ends


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()  # e.g. ("trace-id", ...) from the API to the result


def read_range(c: KafkaConsumer, tp: TopicPartition, start: int, stop: int) -> Iterator[Message]:
    """Every message of one partition with start <= offset < stop (assigns `c` to that partition)."""
    if start >= stop:
        return
    # A consumer without the topic's metadata would sleep its retry backoff (100 ms) on the first poll
    # after assign(); asking for the partitions waits for the metadata instead.
    c.partitions_for_topic(tp.topic)
    c.assign([tp])
    c.seek(tp, start)
    empty_polls = 0
    while True:
        records = c.poll(timeout_ms=POLL_MS).get(tp, [])
        if not records and c.position(tp) >= stop:  # the rest were transaction markers or aborted
            return
        if not records:
            empty_polls += 1
            if empty_polls > 20:
                raise TimeoutError(f"{tp.topic}[{tp.partition}]: no data before offset {stop}, stuck at {start}")
            continue
        empty_polls = 0
        for r in records:
            if r.offset >= stop:
                return
            start = r.offset + 1
            yield Message(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp, tuple(r.headers or ()))
        if start >= stop:
            return


def read_all(bootstrap_servers: str, topic: str) -> list[Message]:
    """Every message of a topic as it stands now, in partition then offset order."""
    c = consumer(bootstrap_servers)
    try:
        tps = partitions_of(c, topic)
        ends = true_end_offsets(c, tps)
        return [m for tp in tps for m in read_range(c, tp, 0, ends[tp])]
    finally:
        c.close()
