"""Erasing a forgotten person outside ingestion's state: the steps every deployment takes once the
erasure is committed, one definition for all of them.

Ingestion's state (DuckDB for the local driver, the runner's keyed state for Prism and the Flink job)
deletes its own rows in the commit that reads the forget request. What remains lives beside it, under
the state folder: the person's Parquet history rows (under their pseudonym), their release-ledger rows,
their backfill progress and the registry entries of the libraries backfilled for them (whose folder
paths often name the person). The local driver runs these steps after its cycle commits
(`pipelines/ingest.py`); for the streaming runners, the history writer runs them on reading the
person's committed tombstone (`pipelines/history_writer.py`).

The steps are idempotent, and counted before they delete: the caller stores the counts first (keeping
the larger of a stored count and a new one), then deletes, so a retry after a crash in between never
reports fewer records than were deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stylestream.analytics import history, pseudonyms
from stylestream.pipelines.layout import StateLayout
from stylestream.pipelines.library import forget_libraries
from stylestream.privacy import erasure
from stylestream.privacy.release import Ledger
from stylestream.schemas.events import ErasureNotice, encode_event
from stylestream.streams.topics import ERASURE_RECEIPTS

ALL_VERSIONS = 2**62  # the erasure's versions where an erasure recorded before tombstones were numbered
LIBRARIES_FILE = "libraries.json"  # in a person's backfill folder: the library ids backfilled for them
# Rows per transaction of a rewrite's copy: one transaction for everything holds all the new indexes in
# memory at once, and at 1 M people that is past the state's memory limit (the commit fails).
COPY_ROWS = 2_000_000


def backfill_folder(state: StateLayout, subject: str) -> Path:
    """The folder of one person's backfill progress files (named by their erasure subject)."""
    return state.backfill / subject


def backfilled_libraries(state: StateLayout, subject: str) -> set[str]:
    with contextlib.suppress(FileNotFoundError):
        return set(json.loads((backfill_folder(state, subject) / LIBRARIES_FILE).read_text()))
    return set()


def outside_state_counts(state: StateLayout, user_id: str, key: bytes,
                         up_to_version: int) -> dict[str, dict[str, int]]:
    """What of the person is kept outside ingestion's state, by store and kind (the receipt's words);
    `up_to_version`: the erasure's tombstone (later versions are of what they sent after it)."""
    subject = erasure.subject(user_id, key)
    folder = backfill_folder(state, subject)
    progress = [p for p in folder.glob("*.json") if p.name != LIBRARIES_FILE] if folder.exists() else []
    rows = history_rows_of(state.history, pseudonyms.pseudonym(user_id, key), up_to_version)
    return {"history": {"style versions": rows},
            "release ledger": {"releases": Ledger(state.root).count(user_id)},
            "backfill": {"progress files": len(progress),
                         "library registrations": len(backfilled_libraries(state, subject))}}


def erase_outside_state(state: StateLayout, user_id: str, key: bytes, up_to_version: int) -> None:
    """Deletes what `outside_state_counts` counts (each step repeatable)."""
    subject = erasure.subject(user_id, key)
    # 1. Their history rows up to the tombstone, under their pseudonym (files rewritten whole).
    history.redact(state.history, [(pseudonyms.pseudonym(user_id, key), 0, up_to_version)])
    # 2. Their release-ledger rows (the ledger file rewritten).
    Ledger(state.root).forget([user_id])
    # 3. The libraries backfilled for them leave the registry (unless someone else's backfill uses one)...
    others = set().union(*(backfilled_libraries(state, s.name) for s in state.backfill.glob("*") if s.name != subject)
                         ) if state.backfill.exists() else set()
    forget_libraries(state.libraries, backfilled_libraries(state, subject) - others)
    # 4. ...and their backfill progress goes: a later backfill of theirs starts over.
    shutil.rmtree(backfill_folder(state, subject), ignore_errors=True)


def history_rows_of(history_dir: Path, user: str, up_to_version: int) -> int:
    """How many history rows are under this (pseudonymous) user id, up to this version."""
    with history.locked(history_dir), duckdb.connect() as db:
        files = sorted(str(f) for f in history_dir.glob("date=*/*.parquet"))  # not while a compaction merges
        if not files:
            return 0
        return db.execute("SELECT count(*) FROM read_parquet($files, hive_partitioning = false) "
                          "WHERE user_id = $u AND version <= $v", {"files": files, "u": user, "v": up_to_version}
                          ).fetchone()[0]


def rewrite_database(db: duckdb.DuckDBPyConnection, path: Path, on_copy: str | None = None,
                     params: list | None = None) -> None:
    """Copies the database to a fresh file that takes `path`'s place, and closes `db`: DuckDB reuses the
    blocks of deleted rows without clearing them, so an erased person's rows would otherwise stay in
    the file. `on_copy` runs on the copy (attached as `fresh`) first. Crash-safe: the copy replaces
    the file by an atomic rename."""
    fresh = path.with_name(path.name + ".rewrite")
    for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):  # of an attempt that crashed
        leftover.unlink(missing_ok=True)
    [(name,)] = db.execute("SELECT current_database()").fetchall()
    db.execute("ATTACH ? AS fresh", [str(fresh)])
    try:
        copy_database(db, name, "fresh")
        if on_copy:
            db.execute(on_copy, params or [])
    finally:
        db.execute("DETACH fresh")
    db.close()
    with fresh.open("rb+") as f:  # on disk before it takes the old file's place
        os.fsync(f.fileno())
    os.replace(fresh, path)


def copy_database(db: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    """`COPY FROM DATABASE source TO target` in pieces: the schema (tables, indexes, sequences, views,
    macros), then each table COPY_ROWS rows at a time in rowid order, each piece committed and
    checkpointed (at 1 M people the copying process peaked at 3.2 GB: the 3 GB limit and the Python
    side). For tables without generated columns or foreign keys, as the state's are."""
    db.execute(f'COPY FROM DATABASE "{source}" TO "{target}" (SCHEMA)')
    tables = db.execute("SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = ? "
                        "ORDER BY ALL", [source]).fetchall()
    for schema, table in tables:
        name = f'"{schema}"."{table}"'
        [(end,)] = db.execute(f'SELECT coalesce(max(rowid) + 1, 0) FROM "{source}".{name}').fetchall()
        for start in range(0, end, COPY_ROWS):  # in rowid order: the copy keeps the insertion order
            db.execute(f'INSERT INTO "{target}".{name} SELECT * FROM "{source}".{name} '
                       "WHERE rowid >= ? AND rowid < ?", [start, start + COPY_ROWS])
            db.execute(f'CHECKPOINT "{target}"')


def merge_counts(before: dict[str, dict[str, int]], now: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Counts of one erasure across tries: the larger of each (a retry finds what a crashed try deleted gone)."""
    out = {store: dict(kinds) for store, kinds in before.items()}
    for store, kinds in now.items():
        for kind, n in kinds.items():
            out.setdefault(store, {})[kind] = max(out.get(store, {}).get(kind, 0), n)
    return out


# --- the erasures in progress and their receipts, in the database of whoever carries them out --------------

RECEIPT_TABLES = """
CREATE TABLE IF NOT EXISTS pending_erasures (cycle BIGINT NOT NULL, user_id VARCHAR NOT NULL, requests VARCHAR[]);
ALTER TABLE pending_erasures ADD COLUMN IF NOT EXISTS up_to_version BIGINT;  -- the tombstone's version
CREATE TABLE IF NOT EXISTS erasure_receipts (
    request_event_id VARCHAR PRIMARY KEY, cycle BIGINT NOT NULL, requested_at TIMESTAMPTZ NOT NULL,
    deleted JSON NOT NULL, receipt JSON, published BOOLEAN NOT NULL DEFAULT false);
"""


class ReceiptBook:
    """Erasures whose outside-state steps are pending, and the receipts of their requests, in a DuckDB
    connection (the local driver's state database, or the history writer's). Writes happen in the
    caller's transaction where it holds one (`open`), else each in its own."""

    def __init__(self, db: duckdb.DuckDBPyConnection, create: bool = True):
        self.db = db
        if create:
            db.execute(RECEIPT_TABLES)

    def open(self, cycle: int, erasure: ErasureNotice, user_id: str, up_to_version: int) -> None:
        """An erasure committed (its tombstone numbered `up_to_version`): its state counts go into its
        requests' receipts (a request seen before keeps its receipt), and its outside-state steps wait."""
        self.db.execute("INSERT INTO pending_erasures BY NAME SELECT ? AS cycle, ? AS user_id, ? AS requests, "
                        "? AS up_to_version", [cycle, user_id, [r.event_id for r in erasure.requests], up_to_version])
        for r in erasure.requests:
            self.db.execute("INSERT OR IGNORE INTO erasure_receipts (request_event_id, cycle, requested_at, deleted) "
                            "VALUES (?, ?, ?, ?)", [r.event_id, cycle, r.requested_at,
                                                    json.dumps({"state": erasure.deleted})])

    def pending(self) -> list[tuple[str, list[str], int]]:
        """(user, their forget requests, the tombstone's version) erased whose outside-state records may
        still exist."""
        return self.db.execute(f"SELECT user_id, requests, coalesce(up_to_version, {ALL_VERSIONS}) "
                               "FROM pending_erasures ORDER BY cycle, user_id").fetchall()

    def record_counts(self, requests: list[str], deleted: dict[str, dict[str, int]]) -> None:
        """What is about to be deleted, counted into the requests' receipts before it is."""
        self.db.execute("BEGIN TRANSACTION")
        for request in requests:
            [(before,)] = self.db.execute("SELECT deleted FROM erasure_receipts WHERE request_event_id = ?",
                                          [request]).fetchall()
            self.db.execute("UPDATE erasure_receipts SET deleted = ? WHERE request_event_id = ?",
                            [json.dumps(merge_counts(json.loads(before), deleted)), request])
        self.db.execute("COMMIT")

    def finish(self, user_id: str) -> None:
        self.db.execute("DELETE FROM pending_erasures WHERE user_id = ?", [user_id])

    def unsigned(self) -> list[tuple[str, datetime, dict[str, dict[str, int]]]]:
        """(request id, requested at, what was deleted) of erasures done but not signed yet."""
        done = "NOT EXISTS (SELECT 1 FROM pending_erasures p WHERE list_contains(p.requests, request_event_id))"
        return [(r, t, json.loads(d)) for r, t, d in self.db.execute(
            f"SELECT request_event_id, requested_at, deleted FROM erasure_receipts WHERE receipt IS NULL AND {done} "
            "ORDER BY request_event_id").fetchall()]

    def save(self, request_id: str, receipt: str) -> None:
        self.db.execute("UPDATE erasure_receipts SET receipt = ? WHERE request_event_id = ?", [receipt, request_id])

    def unpublished(self) -> list[tuple[str, bytes]]:
        return [(r, v.encode()) for r, v in self.db.execute(
            "SELECT request_event_id, receipt FROM erasure_receipts WHERE receipt IS NOT NULL AND NOT published "
            "ORDER BY request_event_id").fetchall()]

    def mark_published(self, request_ids: list[str]) -> None:
        self.db.execute("UPDATE erasure_receipts SET published = true WHERE list_contains(?, request_event_id)",
                        [request_ids])


def erase_pending(book: ReceiptBook, state: StateLayout, key: bytes) -> None:
    """Every committed erasure's outside-state steps: counted into its receipts, then done."""
    for user_id, requests, up_to_version in book.pending():
        book.record_counts(requests, outside_state_counts(state, user_id, key, up_to_version))
        erase_outside_state(state, user_id, key, up_to_version)
        book.finish(user_id)


def sign_and_publish(book: ReceiptBook, signing_key: Callable[[], Ed25519PrivateKey],
                     publish: Callable[[list[tuple[str, bytes, bytes]]], None]) -> None:
    """Receipts of erasures done are signed once (kept, so a retry publishes the same bytes), then
    published on erasure-receipts under their request's id, all at once through `publish` (which
    raises if any send failed)."""
    if unsigned := book.unsigned():
        key = signing_key()
        for request_id, requested_at, deleted in unsigned:
            receipt = erasure.signed_receipt(request_id, requested_at, deleted, datetime.now(UTC), key)
            book.save(request_id, encode_event(receipt).decode())
    if receipts := book.unpublished():
        publish([(ERASURE_RECEIPTS, request_id.encode(), receipt) for request_id, receipt in receipts])
        book.mark_published([r for r, _ in receipts])
