"""Folds the topics the API shows into its own database: each person's photos (references only),
style-learning switches, latest style and manifest, and the results of the generations it asked for.

One thread, one consumer assigned every partition; a batch of messages and the offsets after it are
applied in one SQLite transaction, so after a crash nothing is folded twice or missed. A forget
request or an erasure tombstone deletes every row of the person, grants and generations included,
and (after the commit, `on_forget`) their folder of the image store, where the API wrote their clips'
starting images.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable

from kafka import TopicPartition

from stylestream.api.metrics import ApiMetrics
from stylestream.api.store import ApiStore
from stylestream.schemas.events import InvalidEvent, parse_event
from stylestream.streams import clients
from stylestream.streams.clients import RETRY_FIRST_S, RETRY_MAX_S, TRACE_HEADER, Message
from stylestream.streams.topics import CONSENT_EVENTS, GENERATION_RESULTS, PHOTO_EVENTS, STYLE_MANIFESTS, STYLE_VECTORS
from stylestream.transforms.style import ConsentRecord, scope_key

log = logging.getLogger(__name__)
FOLLOWED = (PHOTO_EVENTS, CONSENT_EVENTS, STYLE_VECTORS, STYLE_MANIFESTS, GENERATION_RESULTS)


def fold(db: sqlite3.Connection, store: ApiStore, m: Message) -> str | None:
    """Apply one message to the read model (in the caller's transaction); invalid ones are skipped
    (ingestion and serving dead-letter them). The person it forgot, if it forgot one."""
    if m.value is None:  # a tombstone on a compacted topic: the person (the key) was forgotten
        if m.topic in (STYLE_VECTORS, STYLE_MANIFESTS) and m.key:
            store.forget(db, m.key.decode())
            return m.key.decode()
        return None
    try:
        e = parse_event(m.topic, m.value)
    except InvalidEvent:
        return None
    if m.topic in (PHOTO_EVENTS, CONSENT_EVENTS):
        gone = store.forgotten_at(db, e.user_id)
        # Void, as ingestion voids it (`plan.after_forgets`): what came before an erasure, a repeated
        # or late forget request included.
        if gone is not None and e.event_time <= gone:
            return None
    match e.type:
        case "photo_uploaded" | "photo_embedded":  # the day only: the page needs no more, and keeps no more
            # The first event of a photo is the one ingestion counts (a photo is never added twice).
            db.execute("INSERT OR IGNORE INTO photos VALUES (?, ?, ?, ?, ?)", (
                e.user_id, e.photo_id, e.album_id, e.event_time.date().isoformat(), int(e.type == "photo_embedded")))
        case "photo_deleted":
            db.execute("DELETE FROM photos WHERE user_id = ? AND photo_id = ?", (e.user_id, e.photo_id))
        case "style_learning_toggled":
            store.fold_consent(db, e.user_id, scope_key(e.scope, e.scope_id),
                               ConsentRecord(e.enabled, e.event_time, e.event_id))
        case "user_forgotten":
            store.forget(db, e.user_id, e.event_time)
            return e.user_id
        case "style_vector_updated" if e.tombstone:
            requested = max((r.requested_at for r in e.erasure.requests), default=None) if e.erasure else None
            gone = store.forgotten_at(db, e.user_id)
            if requested is not None and gone is not None and requested <= gone:
                return None  # an erasure the read model has already done (a replay)
            store.forget(db, e.user_id, requested)
            return e.user_id
        case "style_vector_updated" | "style_manifest":
            table = "style_versions" if e.type == "style_vector_updated" else "manifest_versions"
            store.fold_version(db, table, e.user_id, e.version, m.value.decode())
        case "generation_progress":  # only for requests this API made (their images rows)
            db.execute("""INSERT OR IGNORE INTO previews SELECT ?, ?, user_id, ? FROM images
                          WHERE request_id = ? AND user_id = ?""",
                       (e.request_id, e.partial_image_index, e.image_uri, e.request_id, e.user_id))
        case "generation_completed" | "generation_failed":
            db.execute("UPDATE images SET result = ? WHERE request_id = ? AND user_id = ?",
                       (json.dumps({**json.loads(m.value), "trace_id": _trace(m)}), e.request_id, e.user_id))
    return None


def _trace(m: Message) -> str | None:
    trace = dict(m.headers).get(TRACE_HEADER)
    return trace.decode() if trace else None


class Follower:
    def __init__(self, bootstrap_servers: str, store: ApiStore, on_change: Callable[[], None] = lambda: None,
                 metrics: ApiMetrics | None = None, on_forget: Callable[[str], None] = lambda _user: None):
        self.store, self._on_change, self._on_forget = store, on_change, on_forget
        self.metrics = metrics or ApiMetrics()
        self.retries = 0  # failures met and retried (also on /metrics, by error)
        self._consumer = clients.consumer(bootstrap_servers, fetch_max_wait_ms=100)
        self._probe = clients.QuietProbe(bootstrap_servers)  # a broker gone is reported, not waited out silently
        self._tps = [tp for topic in FOLLOWED for tp in clients.partitions_of(self._consumer, topic)]
        self._consumer.assign(self._tps)
        self._seek_to_stored()
        self._stop = threading.Event()
        self._error: str | None = None  # the last failure, until a fold succeeds again
        self._thread = threading.Thread(target=self._run, name="api-follower", daemon=True)

    def _seek_to_stored(self) -> None:
        """Where the last committed fold stopped (a failed fold's messages are read again)."""
        done = self.store.offsets()
        for tp in self._tps:
            if (tp.topic, tp.partition) in done:
                self._consumer.seek(tp, done[(tp.topic, tp.partition)])
            else:
                self._consumer.seek_to_beginning(tp)

    def failing(self) -> str | None:
        """Why the follower cannot fold the topics right now, or None while it can."""
        if not self._thread.is_alive() and not self._stop.is_set():
            return "stopped"
        return self._error

    def start(self) -> Follower:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._consumer.close()

    def _run(self) -> None:
        """Fold until stopped. A broker away is waited for; any other failure (the database, say) is
        logged and reported by `failing`, and the batch read again from the stored offsets after a
        growing pause: never folded past, never twice."""
        delay, reseek = RETRY_FIRST_S, False
        while not self._stop.is_set():
            try:
                if reseek:
                    self._seek_to_stored()
                    reseek = False
                clients.with_backoff(self.poll_once, self._stop, on_retry=self._broker_away)
                self._error, delay = None, RETRY_FIRST_S
                self.metrics.follower_failing.set(0)
            except Exception as e:
                log.exception("the API's follower failed; reading again from its stored offsets in %.0f s", delay)
                self._failed(e, f"{type(e).__name__}: {e}")
                reseek = True
                self._stop.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)

    def _broker_away(self, e: Exception, delay: float) -> None:
        log.warning("%s; retrying in %.1f s", clients.describe(e), delay)
        self._failed(e, f"broker unavailable ({type(e).__name__})")

    def _failed(self, e: Exception, error: str) -> None:
        """A failure to be retried: reported by `failing` and counted, never silent."""
        self._error = error
        self.retries += 1
        self.metrics.follower_retries.labels(type(clients.cause(e)).__name__).inc()
        self.metrics.follower_failing.set(1)

    def poll_once(self) -> int:
        batches = self._consumer.poll(timeout_ms=200)
        if not batches:
            self._probe.check()
            return 0
        self._probe.heard()
        n, forgot = 0, set()
        with self.store.transaction() as db:
            for tp, records in sorted(batches.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
                # Replicas sharing the database each follow the topics: what another folded is skipped
                done = self._stored_offset(db, tp)
                for r in (r for r in records if r.offset >= done):
                    user = self._fold_one(db, Message(r.topic, r.partition, r.offset, r.key, r.value,
                                                      r.timestamp, tuple(r.headers or ())))
                    forgot |= {user} if user else set()
                    n += 1
                self._save_offset(db, tp, max(done, records[-1].offset + 1))
        if forgot:
            self.store.checkpoint()
            for user in sorted(forgot):  # the starting images the API wrote go too (as the worker deletes them)
                self._on_forget(user)
        if any(tp.topic == GENERATION_RESULTS for tp in batches):  # what requests wait for
            self._on_change()
        return n

    def _fold_one(self, db: sqlite3.Connection, m: Message) -> str | None:
        """`fold`, with a message it cannot use (say, a key that is not UTF-8) logged and skipped, so
        one bad message never stops the rest; the database's own errors end the batch."""
        try:
            return fold(db, self.store, m)
        except sqlite3.Error:
            raise
        except Exception:
            log.exception("skipped a message the API cannot fold: %s[%d]@%d", m.topic, m.partition, m.offset)
            return None

    @staticmethod
    def _stored_offset(db: sqlite3.Connection, tp: TopicPartition) -> int:
        row = db.execute("SELECT next FROM offsets WHERE topic = ? AND part = ?", (tp.topic, tp.partition)).fetchone()
        return row[0] if row else 0

    @staticmethod
    def _save_offset(db: sqlite3.Connection, tp: TopicPartition, next_offset: int) -> None:
        db.execute("INSERT OR REPLACE INTO offsets VALUES (?, ?, ?)", (tp.topic, tp.partition, next_offset))
