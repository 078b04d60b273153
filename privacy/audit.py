"""`stylestream audit`: look for a person, or any given strings, and for image bytes, in every store
the project writes.

Stores searched: the ingestion state (every table, row by row: its file is rewritten after an
erasure, so deleted rows do not linger in it, and DuckDB compresses text, so its raw bytes would show
nothing), the Parquet style history, the other files of the state folder, the generated images'
folder (file names and result records), the HTTP API's database (SQLite keeps text as it is, and
deletes securely), every topic (keys, values, and base64 fields inside them,
so the original of a dead letter is searched too) and any extra file or folder given (logs). A
person is looked for by their user id and by their pseudonym in the history. Image bytes (JPEG, PNG,
WebP, HEIC signatures) may only be in the generated images' folder.

Some findings are not violations, and say why and until when, from the topics' settings as the
broker reports them: on a compacted topic, a value followed by a tombstone for its key (compaction
removes it within max.compaction.lag.ms of the tombstone; past that it is a violation); on the
project's other topics, a person's own messages (keyed by them), which go with the topic's retention;
and anything on the input topics (photo-events, consent-events, generation-requests), which belong
to the photo service (README, "Privacy").
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from stylestream.analytics.pseudonyms import load_key, pseudonym
from stylestream.pipelines.layout import StateLayout
from stylestream.streams import clients
from stylestream.streams.topics import ALL_TOPICS, CONSENT_EVENTS, GENERATION_REQUESTS, PHOTO_EVENTS

# Topics the photo service writes (the project writes photo-events too, to re-ingest, but the service
# owns its retention); every other topic is the project's.
INPUT_TOPICS = (PHOTO_EVENTS, CONSENT_EVENTS, GENERATION_REQUESTS)
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
    pending: str | None = None  # why it is not a violation: the store removes it by itself (and by when),
    # or it is outside what the project writes

    @property
    def violation(self) -> bool:
        return self.pending is None


@functools.cache
def _word(needle: bytes) -> re.Pattern:
    """The needle as a whole word: not inside a longer one (user "ana" is not in "explanation")."""
    return re.compile(rb"(?<![A-Za-z0-9])" + re.escape(needle) + rb"(?![A-Za-z0-9])")


def scan_bytes(blob: bytes, needles: list[bytes], images: bool) -> Iterator[str]:
    """What of `needles` (as whole words; and, if asked, image signatures) `blob` holds, looking into
    base64 fields of JSON inside it too."""
    for needle in needles:
        if needle in blob and _word(needle).search(blob):
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
    """Every row of every table."""
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


def audit_history(history: Path, needles: list[bytes]) -> Iterator[Finding]:
    for path in sorted(p for p in history.rglob("*") if p.is_file()):  # leftover temporary files too
        if path.suffix != ".parquet":
            for what in scan_bytes(path.read_bytes(), needles, images=True):
                yield Finding("history", str(path), what)
            continue
        table = pq.read_table(path)
        for column in table.column_names:
            for i, value in enumerate(table.column(column).to_pylist()):
                for what in scan_bytes(_cell_bytes(value), needles, images=True):
                    yield Finding("history", f"{path.name}: {column} (row {i + 1})", what)


def audit_files(root: Path, needles: list[bytes], store: str, named_by_id: bool = False,
                skip: Iterable[Path] = ()) -> Iterator[Finding]:
    """Contents of the files under `root` (or `root` itself, a file); with `named_by_id` (the generated
    images, in folders named by user id and files by request id) their names too, and images allowed."""
    skipped = {p.resolve() for p in skip}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        if path.resolve() in skipped or any(s in path.resolve().parents for s in skipped):
            continue
        if named_by_id:
            for needle in needles:
                if _word(needle).search(path.relative_to(root).as_posix().encode()):
                    yield Finding(store, str(path), f"{needle.decode()} (in the file's name)")
        for what in scan_bytes(path.read_bytes(), needles, images=not named_by_id):
            yield Finding(store, str(path), what)


# Kafka's defaults, for settings a topic does not override.
KAFKA_DEFAULTS = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000),
                  "max.compaction.lag.ms": str(2**63 - 1), "delete.retention.ms": str(24 * 3600 * 1000)}


def topic_settings(bootstrap_servers: str, topics: Iterable[str]) -> dict[str, dict[str, str]]:
    """Each topic's settings as the broker has them (overrides on Kafka's defaults)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    finally:
        admin.close()
    overrides = found.get("topic", {})
    return {t: KAFKA_DEFAULTS | {k: v["value"] for k, v in overrides.get(t, {}).items()} for t in topics}


def _until(at: datetime, ms: str) -> datetime | None:
    """`at` plus a duration in ms; None for "forever" (-1 or Long.MAX_VALUE)."""
    ms_ = int(ms)
    return None if ms_ < 0 or ms_ >= 2**62 else at + timedelta(milliseconds=ms_)


def topic_note(topic: str, settings: dict[str, str], m: clients.Message, tombstoned_at: datetime | None,
               person: bool, now: datetime) -> str | None:
    """Why a finding in this message is not a violation, and until when; None if it is one."""
    sent = datetime.fromtimestamp(m.timestamp_ms / 1000, UTC)
    if topic in INPUT_TOPICS:
        kept = _until(sent, settings["retention.ms"])
        return f"the photo service's input topic: kept {'until ' + kept.date().isoformat() if kept else 'forever'}"
    if "compact" in settings["cleanup.policy"] and tombstoned_at is not None:
        lag = settings["max.compaction.lag.ms"]
        removed = _until(tombstoned_at, lag)
        if m.value is None:
            removed = removed and _until(removed, settings["delete.retention.ms"])
        if removed is None or removed < now:
            return None  # compaction should have removed it by now, or never will
        return f"{'a tombstone' if m.value is None else 'awaits compaction'}: removed by {removed:%Y-%m-%d %H:%M} UTC"
    if person and "delete" in settings["cleanup.policy"]:
        removed = _until(sent, settings["retention.ms"])
        if removed is not None and removed > now:
            return f"the person's own message: removed with the topic's retention by {removed:%Y-%m-%d}"
    return None


def audit_topics(bootstrap_servers: str, needles: list[bytes], users: list[bytes]) -> Iterator[Finding]:
    now = datetime.now(UTC)
    settings = topic_settings(bootstrap_servers, ALL_TOPICS)
    for topic in ALL_TOPICS:
        messages = clients.read_all(bootstrap_servers, topic)
        tombstones = {(m.partition, m.key): datetime.fromtimestamp(m.timestamp_ms / 1000, UTC)
                      for m in messages if m.value is None and m.key is not None}
        last = {(m.partition, m.key): m.offset for m in messages if m.value is None and m.key is not None}
        for m in messages:
            before_tombstone = m.offset <= last.get((m.partition, m.key), -1)
            for part in (m.key or b"", m.value or b""):
                for what in scan_bytes(part, needles, images=True):
                    note = topic_note(topic, settings[topic], m,
                                      tombstones.get((m.partition, m.key)) if before_tombstone else None,
                                      m.key in users, now)
                    yield Finding(f"topic {topic}", f"{topic}[{m.partition}]@{m.offset}", what, note)


def needles_for(user_ids: list[str], strings: list[str], state: StateLayout) -> list[bytes]:
    """The byte strings to look for: the strings, each user id and, where the state has its key,
    each user's pseudonym."""
    out = [s.encode() for s in strings] + [u.encode() for u in user_ids]
    if user_ids and state.analytics_key.exists():
        key = load_key(state.analytics_key)
        out += [pseudonym(u, key).encode() for u in user_ids]
    return list(dict.fromkeys(out))


def audit(state: StateLayout, images: Path, needles: list[bytes], bootstrap_servers: str | None,
          extra: Iterable[Path] = (), users: Iterable[str] = (), api: Path | None = None) -> list[Finding]:
    """Every finding in every store the project writes under `state`, `images` and `api` (the HTTP
    API's database and keys, searched byte by byte), on the broker's topics if one is given, and in
    the extra files or folders; `users`: the people looked for (their own messages on a topic go
    with its retention)."""
    findings = list(audit_state_database(state.db, needles))
    findings += audit_history(state.history, needles)
    if state.root.exists():
        findings += audit_files(state.root, needles, "state files",
                                skip=[state.history, state.db, state.db.with_name(state.db.name + ".wal")])
    if images.exists():
        findings += audit_files(images, needles, "generated images", named_by_id=True)
    if api is not None and api.exists():
        findings += audit_files(api, needles, "API database")
    if bootstrap_servers:
        findings += audit_topics(bootstrap_servers, needles, [u.encode() for u in users])
    for path in extra:
        findings += audit_files(path, needles, f"extra: {path}")
    return findings

