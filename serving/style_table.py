"""In-memory table of every user's style versions, fed by the style-vectors topic.

Rebuilt on start by reading the topic from the beginning, then kept current by polling between
requests. The topic is compacted by user on Kafka, so a new table holds each user's latest version
(and the versions not compacted yet); Tansu does not compact, so there it holds every version.
"""

from __future__ import annotations

import logging

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
        tps = clients.partitions_of(self._consumer, STYLE_VECTORS)
        self._ends = clients.true_end_offsets(self._consumer, tps)
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)

    def close(self) -> None:
        self._consumer.close()

    def catch_up(self) -> int:
        """Read until every partition reaches the end it had when the table was created."""
        n = 0
        while any(self._consumer.position(tp) < end for tp, end in self._ends.items()):
            n += self.poll(timeout_ms=clients.POLL_MS)
        return n

    def poll(self, timeout_ms: int = 0) -> int:
        n = 0
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            for r in records:
                if r.value is None:  # a tombstone: the person (the key) asked to be forgotten
                    self._forget(r.key.decode())
                    n += 1
                    continue
                try:
                    v = parse_event(STYLE_VECTORS, r.value)
                except InvalidEvent as e:
                    log.warning("skipping bad style vector at %s[%d]@%d: %s", r.topic, r.partition, r.offset, e)
                    continue
                if v.tombstone:
                    self._forget(v.user_id)
                    n += 1
                    continue
                versions = self._versions.setdefault(v.user_id, {})
                versions[v.version] = v
                for gone in v.withdrawn_versions:  # keyed by user: they came before this event
                    versions.pop(gone, None)
                self._withdrawn.setdefault(v.user_id, set()).update(v.withdrawn_versions)
                n += 1
        return n

    def _forget(self, user_id: str) -> None:
        self._versions.pop(user_id, None)
        self._withdrawn.pop(user_id, None)
        self._forgotten.add(user_id)

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
