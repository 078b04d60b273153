"""In-memory table of every user's style versions, fed by the style-vectors topic.

Rebuilt on start by reading the topic from the beginning, then kept current by polling between
requests. The topic is compacted by user on Kafka, so a new table holds each user's latest version
(and the versions not compacted yet); Tansu does not compact, so there it holds every version.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from stylestream.schemas.events import InvalidEvent, StyleVectorUpdated, parse_event
from stylestream.streams import clients
from stylestream.streams.topics import STYLE_VECTORS

log = logging.getLogger(__name__)


class StyleTable:
    def __init__(self, bootstrap_servers: str):
        self._consumer = clients.consumer(bootstrap_servers)
        self._versions: dict[str, dict[int, StyleVectorUpdated]] = {}
        self._withdrawn: dict[str, set[int]] = {}  # versions that counted photos since withdrawn
        self._forgotten: set[str] = set()  # people erased since the last `take_forgotten`
        self._forgotten_at: dict[str, datetime] = {}  # when each person erased was forgotten
        self._lister = clients.consumer(bootstrap_servers)  # asks for end offsets while the other reads
        self._known_ends: dict = {}
        self._tps = clients.partitions_of(self._consumer, STYLE_VECTORS)
        self._consumer.assign(self._tps)
        self._consumer.seek_to_beginning(*self._tps)

    def close(self) -> None:
        self._consumer.close()
        self._lister.close()

    def catch_up(self) -> int:
        """Read until every partition reaches the end it has now: a version, a withdrawal or an erasure
        published before a request was collected is known before the request is answered."""
        ends = clients.true_end_offsets(self._lister, self._tps, known=self._known_ends, reader=self._lister)
        n = 0
        while any(self._consumer.position(tp) < end for tp, end in ends.items()):
            n += self.poll(timeout_ms=clients.POLL_MS)
        return n

    def poll(self, timeout_ms: int = 0) -> int:
        n = 0
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for r in records:
                if r.value is None:  # a tombstone: the person (the key) asked to be forgotten
                    try:
                        user_id = r.key.decode()
                    except (AttributeError, UnicodeDecodeError):  # no key, or not a user id: not ours
                        log.warning("skipping a tombstone without a user id at %s[%d]@%d", r.topic, r.partition,
                                    r.offset)
                        continue
                    self._forget(user_id, datetime.fromtimestamp(r.timestamp / 1000, UTC))
                    n += 1
                    continue
                try:
                    v = parse_event(STYLE_VECTORS, r.value)
                except InvalidEvent as e:
                    log.warning("skipping bad style vector at %s[%d]@%d: %s", r.topic, r.partition, r.offset, e)
                    continue
                if v.tombstone:
                    self._forget(v.user_id, v.event_time)
                    n += 1
                    continue
                versions = self._versions.setdefault(v.user_id, {})
                versions[v.version] = v
                for gone in v.withdrawn_versions:  # keyed by user: they came before this event
                    versions.pop(gone, None)
                self._withdrawn.setdefault(v.user_id, set()).update(v.withdrawn_versions)
                n += 1
        return n

    def _forget(self, user_id: str, at: datetime) -> None:
        self._versions.pop(user_id, None)
        self._withdrawn.pop(user_id, None)
        self._forgotten.add(user_id)
        self._forgotten_at[user_id] = max(at, self._forgotten_at.get(user_id, at))

    def forgotten_since(self, user_id: str, when: datetime) -> bool:
        """True if the person was forgotten after `when` (a request made before that is void)."""
        return user_id in self._forgotten_at and when <= self._forgotten_at[user_id]

    def take_forgotten(self) -> set[str]:
        """The people erased since the last call (their files are the worker's to delete)."""
        out, self._forgotten = self._forgotten, set()
        return out

    def get(self, user_id: str, version: int | None = None) -> StyleVectorUpdated | None:
        """The pinned version, or the latest one; None if unknown."""
        versions = self._versions.get(user_id)
        if not versions:
            return None
        return versions.get(version) if version is not None else versions[max(versions)]

    def version_with_code(self, user_id: str, code: str) -> int | None:
        """The latest kept version of the user with this style code (the same photos may come back)."""
        return max((v for v, s in self._versions.get(user_id, {}).items() if s.style_code == code), default=None)

    def withdrawn(self, user_id: str, version: int) -> bool:
        """True if that version counted photos the user has since withdrawn: it must not be used."""
        return version in self._withdrawn.get(user_id, ())

    def users(self) -> list[str]:
        return sorted(self._versions)
