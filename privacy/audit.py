"""`stylestream audit`: look for a person, or any given strings, and for image bytes, in every store
the project writes.

Stores searched: the ingestion state (every table, row by row, and the raw bytes of the database file,
where deleted rows could linger), the Parquet style history, the other files of the state folder, the
generated images' folder (paths and result records), every topic the project writes (keys, values,
and base64 fields inside them, so the original of a dead letter is searched too) and any extra file
or folder given (logs). A person is looked for by their user id and by their pseudonym in the history.
Image bytes (JPEG, PNG, WebP, HEIC signatures) may only be in the generated images' folder.

On a compacted topic a value followed by a tombstone for its key is not a finding but pending: the
broker removes it by compaction within max.compaction.lag.ms, and the tombstone later. The input
topics (photo-events, consent-events, generation-requests) belong to the photo service and are not
searched; their retention is theirs to set (README, "Privacy").
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from stylestream.analytics.pseudonyms import load_key, pseudonym
from stylestream.pipelines.layout import StateLayout
from stylestream.streams import clients
from stylestream.streams.topics import ALL_TOPICS, CONSENT_EVENTS, GENERATION_REQUESTS, PHOTO_EVENTS, TOPIC_CONFIGS

# Topics the photo service writes (the project writes photo-events too, to re-ingest, but the service
# owns its retention); every other topic is the project's.
INPUT_TOPICS = (PHOTO_EVENTS, CONSENT_EVENTS, GENERATION_REQUESTS)
PROJECT_TOPICS = tuple(t for t in ALL_TOPICS if t not in INPUT_TOPICS)
IMAGE_SIGNATURES = {
    "JPEG": re.compile(rb"\xff\xd8\xff[\xdb\xe0-\xef\xfe]"),
    "PNG": re.compile(re.escape(b"\x89PNG\r\n\x1a\n")),
    "WebP": re.compile(rb"RIFF....WEBPVP8", re.DOTALL),
    "HEIC": re.compile(rb"ftyp(heic|heix|hevc|mif1|msf1)"),
}
BASE64_FIELD = "_base64"  # JSON fields with this suffix hold bytes (dead letters, inline photos)


@dataclass(frozen=True)
class Finding:
    store: str
    where: str
    what: str  # the string found, or "<format> image bytes"
    pending: str | None = None  # set when the store removes it by itself (compaction), and by when

    @property
    def violation(self) -> bool:
        return self.pending is None


def scan_bytes(blob: bytes, needles: list[bytes], images: bool) -> Iterator[str]:
    """What of `needles` (and, if asked, image signatures) `blob` holds, looking into base64 fields
    of JSON inside it too."""
    for needle in needles:
        if needle in blob:
            yield needle.decode(errors="replace")
    if images:
        for name, signature in IMAGE_SIGNATURES.items():
            if signature.search(blob):
                yield f"{name} image bytes"
    for inner in _base64_fields(blob):
        yield from scan_bytes(inner, needles, images)


def _base64_fields(blob: bytes) -> Iterator[bytes]:
    if blob.lstrip()[:1] not in (b"{", b"["):
        return
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        return
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and k.endswith(BASE64_FIELD):
                    try:
                        yield base64.b64decode(v, validate=True)
                    except (binascii.Error, ValueError):
                        continue
                elif isinstance(v, dict | list):
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def _cell_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode() if value is not None else b""


def audit_state_database(db_path: Path, needles: list[bytes]) -> Iterator[Finding]:
    """Every row of every table; then the file's raw bytes, where deleted rows could remain."""
    if not db_path.exists():
        return
    try:
        db = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as e:
        raise RuntimeError(f"cannot open {db_path} ({e}); stop ingestion while auditing (DuckDB allows one "
                           "writer process, and no reader beside it)") from None
    with db:
        tables = [t for (t,) in db.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        for table in tables:
            cursor = db.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            n = 0
            while rows := cursor.fetchmany(1000):
                for row in rows:
                    n += 1
                    for column, value in zip(columns, row, strict=True):
                        for what in scan_bytes(_cell_bytes(value), needles, images=True):
                            yield Finding("state database", f"{table}.{column} (row {n})", what)
    for path in (db_path, db_path.with_name(db_path.name + ".wal")):
        if path.exists():
            raw = path.read_bytes()
            for what in scan_bytes(raw, needles, images=False):
                yield Finding("state database file", str(path), what)


def audit_history(history: Path, needles: list[bytes]) -> Iterator[Finding]:
    for path in sorted(history.glob("date=*/*.parquet")):
        table = pq.read_table(path)
        for column in table.column_names:
            for i, value in enumerate(table.column(column).to_pylist()):
                for what in scan_bytes(_cell_bytes(value), needles, images=True):
                    yield Finding("history", f"{path.name}: {column} (row {i + 1})", what)


def audit_files(root: Path, needles: list[bytes], store: str, images_allowed: bool = False,
                skip: Iterable[Path] = ()) -> Iterator[Finding]:
    """Names and contents of the files under `root` (or `root` itself, a file)."""
    skipped = {p.resolve() for p in skip}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        if path.resolve() in skipped or any(s in path.resolve().parents for s in skipped):
            continue
        for needle in needles:
            if needle.decode() in str(path.relative_to(root) if root.is_dir() else path.name):
                yield Finding(store, str(path), f"{needle.decode()} (in the file's name)")
        for what in scan_bytes(path.read_bytes(), needles, images=not images_allowed):
            yield Finding(store, str(path), what)


def audit_topics(bootstrap_servers: str, needles: list[bytes]) -> Iterator[Finding]:
    for topic in PROJECT_TOPICS:
        messages = clients.read_all(bootstrap_servers, topic)
        compacted = "compact" in TOPIC_CONFIGS.get(topic, {}).get("cleanup.policy", "")
        lag = timedelta(milliseconds=int(TOPIC_CONFIGS.get(topic, {}).get("max.compaction.lag.ms", 0)))
        kept = timedelta(milliseconds=int(TOPIC_CONFIGS.get(topic, {}).get("delete.retention.ms", 0)))
        tombstoned: dict[tuple[int, bytes], int] = {}  # (partition, key) -> offset of its last tombstone
        for m in messages:
            if m.value is None and m.key is not None:
                tombstoned[(m.partition, m.key)] = m.offset
        for m in messages:
            where = f"{topic}[{m.partition}]@{m.offset}"
            at = datetime.fromtimestamp(m.timestamp_ms / 1000, UTC)
            for part in (m.key or b"", m.value or b""):
                for what in scan_bytes(part, needles, images=True):
                    pending = None
                    last = tombstoned.get((m.partition, m.key or b""))
                    if compacted and last is not None and m.value is None:
                        pending = f"a tombstone: removed by {(at + lag + kept).isoformat(timespec='seconds')}"
                    elif compacted and last is not None and m.offset < last:
                        pending = f"awaits compaction: removed by {(at + lag).isoformat(timespec='seconds')}"
                    yield Finding(f"topic {topic}", where, what, pending)


def needles_for(user_ids: list[str], strings: list[str], state: StateLayout) -> list[bytes]:
    """The byte strings to look for: the strings, each user id and, where the state has its key,
    each user's pseudonym."""
    out = [s.encode() for s in strings] + [u.encode() for u in user_ids]
    if user_ids and state.analytics_key.exists():
        key = load_key(state.analytics_key)
        out += [pseudonym(u, key).encode() for u in user_ids]
    return list(dict.fromkeys(out))


def audit(state: StateLayout, images: Path, needles: list[bytes], bootstrap_servers: str | None,
          extra: Iterable[Path] = ()) -> list[Finding]:
    """Every finding in every store the project writes under `state` and `images`, on the broker's
    topics if one is given, and in the extra files or folders."""
    findings = list(audit_state_database(state.db, needles))
    findings += audit_history(state.history, needles)
    if state.root.exists():
        findings += audit_files(state.root, needles, "state files",
                                skip=[state.history, state.db, state.db.with_name(state.db.name + ".wal")])
    if images.exists():
        findings += audit_files(images, needles, "generated images", images_allowed=True)
    if bootstrap_servers:
        findings += audit_topics(bootstrap_servers, needles)
    for path in extra:
        findings += audit_files(path, needles, f"extra: {path}")
    return findings

