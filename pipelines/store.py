"""DuckDB state of ingestion: per-user style state, consent, Kafka offsets and an outbox.

One cycle commits in one transaction: the per-user updates, the offsets that produced them, the new
style versions, and the messages still to publish (style vectors, dead letters) in `outbox`. After
the commit the driver publishes the outbox and writes the cycle's Parquet history file; both steps
are marked done in the database, so a crash in between repeats them on restart (Kafka consumers
take the latest version per user; a history file is rewritten whole under the same name), and the
history never shows a cycle that did not commit.

DuckDB allows one writer process; analytics read the Parquet history, never this file.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa

from stylestream.pipelines.forgetting import ReceiptBook, rewrite_database
from stylestream.pipelines.plan import CycleWrites, Erasure, NewVersion, Redaction
from stylestream.privacy.erasure import STATE_KINDS
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import StyleBasis
from stylestream.schemas.tables import FEATURE_NAMES, STYLE_HISTORY
from stylestream.streams.topics import PHOTO_EVENTS
from stylestream.transforms.kafka_read import OffsetRange
from stylestream.transforms.records import UserBatch
from stylestream.transforms.style import ConsentRecord, StoredContribution, StyleStats, UserView

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (
    topic VARCHAR, partition INTEGER, next_offset BIGINT NOT NULL, PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS cycles (
    cycle BIGINT PRIMARY KEY, committed_at TIMESTAMPTZ NOT NULL, events BIGINT NOT NULL,
    photos BIGINT NOT NULL, dead_letters BIGINT NOT NULL, users_updated BIGINT NOT NULL,
    published BOOLEAN NOT NULL DEFAULT false, history_written BOOLEAN NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS consent (
    user_id VARCHAR, scope_key VARCHAR, enabled BOOLEAN NOT NULL, event_time TIMESTAMPTZ NOT NULL,
    event_id VARCHAR NOT NULL, PRIMARY KEY (user_id, scope_key));
CREATE TABLE IF NOT EXISTS tombstones (
    user_id VARCHAR, photo_id VARCHAR, deleted_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (user_id, photo_id));
CREATE TABLE IF NOT EXISTS photos (
    user_id VARCHAR, photo_id VARCHAR, album_id VARCHAR, upload JSON NOT NULL, PRIMARY KEY (user_id, photo_id));
CREATE TABLE IF NOT EXISTS contributions (
    user_id VARCHAR, photo_id VARCHAR, album_id VARCHAR, taken_at TIMESTAMPTZ NOT NULL,
    weight DOUBLE NOT NULL, embedding FLOAT[] NOT NULL, features FLOAT[] NOT NULL, metadata JSON,
    added_version BIGINT NOT NULL, sha256 VARCHAR, PRIMARY KEY (user_id, photo_id));
ALTER TABLE contributions ADD COLUMN IF NOT EXISTS sha256 VARCHAR;  -- state written before manifests
ALTER TABLE contributions ADD COLUMN IF NOT EXISTS on_device BOOLEAN DEFAULT false;  -- before device contributions
CREATE TABLE IF NOT EXISTS user_stats (
    user_id VARCHAR PRIMARY KEY, version BIGINT NOT NULL, photo_count BIGINT NOT NULL,
    total_weight DOUBLE NOT NULL, sum_embedding DOUBLE[] NOT NULL, sum_features DOUBLE[] NOT NULL);
CREATE TABLE IF NOT EXISTS style_versions (
    user_id VARCHAR, version BIGINT, cycle BIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL,
    photo_count BIGINT NOT NULL, total_weight DOUBLE NOT NULL, embedding FLOAT[] NOT NULL,
    features FLOAT[] NOT NULL,
    facets STRUCT(photo_count BIGINT, total_weight DOUBLE, embedding FLOAT[], features FLOAT[])[] NOT NULL,
    tombstone BOOLEAN NOT NULL, PRIMARY KEY (user_id, version));
CREATE TABLE IF NOT EXISTS redactions (
    cycle BIGINT NOT NULL, user_id VARCHAR NOT NULL, from_version BIGINT NOT NULL, to_version BIGINT NOT NULL,
    applied BOOLEAN NOT NULL DEFAULT false, PRIMARY KEY (cycle, user_id));
CREATE TABLE IF NOT EXISTS outbox (
    cycle BIGINT NOT NULL, seq BIGINT NOT NULL, topic VARCHAR NOT NULL, key BLOB, value BLOB,
    PRIMARY KEY (cycle, seq));
ALTER TABLE outbox ALTER COLUMN value DROP NOT NULL;  -- null: a tombstone (state written before erasures)
CREATE TABLE IF NOT EXISTS forgotten (subject VARCHAR PRIMARY KEY, forgotten_at TIMESTAMPTZ NOT NULL);
ALTER TABLE forgotten ADD COLUMN IF NOT EXISTS version BIGINT;  -- the tombstone's: later versions follow it
-- A cycle reads and deletes the rows of its people only: by these indexes, not by scanning everyone's
-- (a composite key's index serves no lookup by its first column alone). Queries filter on
-- list_contains($users, user_id) for it; a join alone would scan the table (bench/scale.py).
CREATE INDEX IF NOT EXISTS contributions_user ON contributions (user_id);
CREATE INDEX IF NOT EXISTS photos_user ON photos (user_id);
CREATE INDEX IF NOT EXISTS tombstones_user ON tombstones (user_id);
CREATE INDEX IF NOT EXISTS consent_user ON consent (user_id);
CREATE INDEX IF NOT EXISTS style_versions_user ON style_versions (user_id);
"""  # and the erasures in progress with their receipts (pipelines/forgetting.ReceiptBook)
PERSONAL_TABLES = STATE_KINDS  # every table holding a person's rows, and what the receipt calls them
COMPACTION_DUE = "compaction_due"  # meta key: erased rows may still sit in the file's free blocks (since when)
TRANSACTIONAL_ID = "transactional_id"  # meta key: the Kafka transactional.id of the state's outputs
# DuckDB's buffer pool for the state file (its default is 80 % of the machine's memory): a forget's
# rewrite of 100 k people's state held 5.5 GB before this limit. Past it, DuckDB spills to
# `<state file>.tmp` where an operator can, and fails with an out-of-memory error where it cannot.
MEMORY_LIMIT = "3GB"


def of_users(table: str, columns: str = "*") -> str:
    """The rows of `table` whose user_id is in the query's $users, as a subquery: looked up by the
    table's user_id index. Joined to a table of keys, a plain join would scan every person's rows."""
    return f"(SELECT {columns} FROM {table} WHERE list_contains($users, user_id))"


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class CycleResult:
    cycle: int
    events: int
    photos: int  # uploads and device contributions among the events
    dead_letters: int
    users_updated: int
    lag: int | None = None  # events left on the input topics when the cycle was planned, after it


class LatestVersion(NamedTuple):
    version: int
    embedding: np.ndarray
    features: np.ndarray
    photo_count: int


class Store:
    def __init__(self, path: Path | str, create: bool = True):
        """`create=False`: the file and its tables exist already (the ingestion steps, which run while
        the Ingestor holds the state open), and running the schema's statements again is skipped."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = duckdb.connect(str(self.path), config={"memory_limit": MEMORY_LIMIT})
            if create:
                self.db.execute(SCHEMA)
            self.receipts = ReceiptBook(self.db, create)
        except duckdb.Error as e:
            raise StoreError(f"cannot open the state database {self.path}: {e}. If another ingestion holds it, "
                             "stop that one; if the file is damaged, restore it from a backup (the Parquet "
                             "history keeps every committed version)") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _table(self, name: str, table: pa.Table):
        """`table` queryable as `name` for the duration (how lists of keys reach the SQL)."""
        self.db.register(name, table)
        try:
            yield
        finally:
            self.db.unregister(name)

    # --------------------------------------------------------------------------------- reading
    def offsets(self) -> dict[tuple[str, int], int]:
        rows = self.db.execute("SELECT topic, partition, next_offset FROM offsets").fetchall()
        return {(t, p): o for t, p, o in rows}

    def cycle_result(self, cycle: int) -> CycleResult:
        row = self.db.execute("""SELECT cycle, events, photos, dead_letters, users_updated FROM cycles
                                 WHERE cycle = ?""", [cycle]).fetchone()
        if row is None:
            raise StoreError(f"cycle {cycle} did not commit")
        return CycleResult(*row)

    def next_cycle(self) -> int:
        return self.db.execute("SELECT coalesce(max(cycle), 0) + 1 FROM cycles").fetchone()[0]

    def check_basis(self, basis: StyleBasis, embedding_dim: int) -> None:
        """Remember what styles are computed from on first use (model, half-life, preprocessing); refuse
        to mix contributions computed otherwise, which no manifest could then describe."""
        want = {"clip_model": basis.model, "embedding_dim": str(embedding_dim), "features": ",".join(FEATURE_NAMES),
                "half_life_days": repr(basis.half_life_days), "preprocessing": basis.preprocessing}
        have = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        clash = {k: (have[k], v) for k, v in want.items() if k in have and have[k] != v}
        if clash:
            raise StoreError(f"{self.path} holds style state computed otherwise {clash} (stored, configured): "
                             "use the stored settings, or a new state directory")
        self._insert("meta", {"key": list(want), "value": list(want.values())}, "OR IGNORE")

    def transactional_id(self) -> str:
        """The Kafka transactional.id of this state's outputs, made once: an ingestor on a copy of the
        state fences the one before it."""
        self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                        [TRANSACTIONAL_ID, f"stylestream-ingest-{uuid.uuid4()}"])
        return self.db.execute("SELECT value FROM meta WHERE key = ?", [TRANSACTIONAL_ID]).fetchone()[0]

    def latest_vectors(self) -> dict[str, LatestVersion]:
        """user_id -> each user's latest style version."""
        rows = self.db.execute("""
            SELECT user_id, version, embedding, features, photo_count FROM style_versions
            QUALIFY version = max(version) OVER (PARTITION BY user_id)""").fetchall()
        return {u: LatestVersion(v, np.array(e, np.float32), np.array(f, np.float32), n) for u, v, e, f, n in rows}

    def contributions(self, user_id: str) -> list[tuple[str, str | None, float, np.ndarray, np.ndarray]]:
        """(photo_id, album_id, weight, embedding, features) of each of the user's stored contributions."""
        return [(p, c.album_id, c.weight, c.embedding, c.features)
                for p, c in self.stored_contributions([user_id])[user_id].items()]

    def stored_contributions(self, users: list[str]) -> dict[str, dict[str, StoredContribution]]:
        """Every stored contribution of these users: user_id -> photo_id -> contribution."""
        out: dict[str, dict[str, StoredContribution]] = {u: {} for u in users}
        # Through Arrow: the vectors as two matrices, not a Python list per row (a cycle of a thousand
        # people reads tens of thousands of them).
        t = self.db.sql("SELECT user_id, photo_id, album_id, weight, embedding, features, added_version, sha256, "
                        "on_device FROM contributions WHERE list_contains($users, user_id) ORDER BY user_id, photo_id",
                        params={"users": users}).to_arrow_table()
        if t.num_rows == 0:
            return out
        emb, feat = (t[c].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
                     for c in ("embedding", "features"))
        columns = (t[c].to_pylist() for c in ("user_id", "photo_id", "album_id", "weight", "added_version", "sha256",
                                              "on_device"))
        for i, (u, p, a, w, v, h, d) in enumerate(zip(*columns, strict=True)):
            out[u][p] = StoredContribution(a, w, emb[i], feat[i], v, h, bool(d))
        return out

    def user_views(self, batches: list[UserBatch], dim: int, subjects: dict[str, str]) -> dict[str, UserView]:
        """What the store holds that the batches can touch, for all their users in a few queries
        (`subjects`: each user's erasure subject, to find whether and when they were forgotten)."""
        users = [b.user_id for b in batches]
        scopes = {b.user_id: b.scopes() for b in batches}
        photo_keys = pa.table({"user_id": [u for u in users for _ in scopes[u][0]],
                               "photo_id": [p for u in users for p in sorted(scopes[u][0])]},
                              schema=pa.schema([("user_id", pa.string()), ("photo_id", pa.string())]))
        album_keys = pa.table({"user_id": [u for u in users for _ in scopes[u][1]],
                               "album_id": [a for u in users for a in sorted(scopes[u][1])]},
                              schema=pa.schema([("user_id", pa.string()), ("album_id", pa.string())]))
        whole = [u for u in users if scopes[u][2]]
        views = {u: UserView.empty(dim, len(FEATURE_NAMES)) for u in users}
        for u, stored in self.stored_contributions(users).items():
            views[u].stored = stored
        with self._table("photo_keys", photo_keys), self._table("album_keys", album_keys):
            for u, version, count, weight, se, sf in self.db.execute(
                    "SELECT user_id, version, photo_count, total_weight, sum_embedding, sum_features FROM user_stats "
                    "WHERE list_contains($users, user_id)", {"users": users}).fetchall():
                views[u].stats = StyleStats(np.array(se, np.float64), np.array(sf, np.float64), weight, count)
                views[u].version = version
            for u, key, enabled, t, event_id in self.db.execute(
                    "SELECT user_id, scope_key, enabled, event_time, event_id FROM consent "
                    "WHERE list_contains($users, user_id)", {"users": users}).fetchall():
                views[u].consent[key] = ConsentRecord(enabled, t, event_id)
            forgotten = {s: (t, v) for s, t, v in self.db.execute(
                "SELECT subject, forgotten_at, version FROM forgotten WHERE list_contains(?, subject)",
                [[subjects[u] for u in users]]).fetchall()}
            for u in users:
                views[u].forgotten_at, after = forgotten.get(subjects[u], (None, None))
                views[u].version = max(views[u].version, after or 0)
            for u, p in self.db.execute(
                    f"WITH t AS MATERIALIZED {of_users('tombstones')} SELECT t.user_id, t.photo_id FROM t "
                    "SEMI JOIN photo_keys k ON k.user_id = t.user_id AND k.photo_id = t.photo_id",
                    {"users": users}).fetchall():
                views[u].deleted.add(p)
            # Touched catalogued photos: of a whole-user batch, of its photos, of its albums; with their
            # files' sha256 as records.catalogued_sha256 reads them (a device's, or a reference's).
            named = "EXISTS (SELECT 1 FROM photo_keys k WHERE k.user_id = t.user_id AND k.photo_id = t.photo_id)"
            in_album = "EXISTS (SELECT 1 FROM album_keys k WHERE k.user_id = t.user_id AND k.album_id = t.album_id)"
            for u, p, a, sha, is_named in self.db.execute(
                    f"""WITH t AS MATERIALIZED {of_users('photos')}
                        SELECT user_id, photo_id, album_id, coalesce(upload->>'$.sha256', upload->>'$.image.sha256'),
                               {named}
                        FROM t WHERE list_contains($whole, t.user_id) OR {named} OR {in_album}""",
                    {"users": users, "whole": whole}).fetchall():
                views[u].catalog[p] = a
                if is_named and sha is not None:
                    views[u].files[p] = sha
        return views

    # --------------------------------------------------------------------------------- the commit
    def commit_cycle(self, cycle: int, ranges: Iterable[OffsetRange], writes: CycleWrites,
                     dead_letters: Iterable[DeadLetter], subjects: dict[str, str]) -> CycleResult:
        """Record one cycle's planned writes (pipelines/plan.py) and its offsets, atomically.
        `subjects`: the erasure subject (privacy/erasure.subject) of each user the writes erase."""
        ranges, dead_letters = list(ranges), list(dead_letters)
        # 1. Offsets: a commit the runner retried is in already; a gap means another writer ran
        if self._committed(cycle, ranges):
            return self.cycle_result(cycle)
        with self._transaction(cycle):
            self._check_offsets(ranges)
            # 2. Redact: the versions that counted withdrawn photos (the history follows after the commit);
            #    erase the people who asked to be forgotten, with receipts
            self._write_redactions(cycle, writes.redactions)
            erased = self._erase(cycle, writes.erasures, subjects, writes.planned_at)
            # 3. Write: consent, deletions, catalogue, contributions, the new versions, offsets, the cycle
            self._write_updates(writes)
            self._write_versions(cycle, writes.planned_at, writes.versions)
            self._insert("offsets", {"topic": [r.topic for r in ranges], "partition": [r.partition for r in ranges],
                                     "next_offset": [r.stop for r in ranges]}, "OR REPLACE")
            result = CycleResult(cycle, sum(len(r) for r in ranges), writes.photos, len(dead_letters),
                                 len(writes.versions))
            self.db.execute("INSERT INTO cycles VALUES (?, ?, ?, ?, ?, ?, false, false)",
                            [cycle, datetime.now(UTC), result.events, result.photos, result.dead_letters,
                             result.users_updated])
            # 4. Outbox: uploads to re-ingest, the new style vectors, dead letters (published after the commit)
            reingest = [(PHOTO_EVENTS, u.encode(), upload) for u, upload in self._uploads(writes.reingest)]
            vectors = [m for v in writes.versions for m in v.messages()]
            # an erasure's tombstones come first: what the person sent after it follows them
            self._write_outbox(cycle, erased + reingest + vectors + [d.message() for d in dead_letters])
        return result

    def _committed(self, cycle: int, ranges: list[OffsetRange]) -> bool:
        stored = self.offsets()
        return bool(ranges) and all(stored.get((r.topic, r.partition)) == r.stop for r in ranges) and bool(
            self.db.execute("SELECT 1 FROM cycles WHERE cycle = ?", [cycle]).fetchone())

    def _check_offsets(self, ranges: list[OffsetRange]) -> None:
        stored = self.offsets()
        for r in ranges:
            if stored.get((r.topic, r.partition), 0) != r.start:
                raise StoreError(f"{r.topic}[{r.partition}] is at offset {stored.get((r.topic, r.partition), 0)}, "
                                 f"the cycle starts at {r.start}: another writer ran in between")

    @contextlib.contextmanager
    def _transaction(self, cycle: int):
        self.db.execute("BEGIN TRANSACTION")
        try:
            yield
            self.db.execute("COMMIT")
        except (duckdb.IOException, duckdb.TransactionException) as e:  # a failed write fails the commit
            with contextlib.suppress(duckdb.Error):
                self.db.execute("ROLLBACK")
            raise StoreError(f"cannot write the state database {self.path} (disk full?): {e}; nothing of cycle "
                             f"{cycle} was committed and everything before it is intact") from e
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _insert(self, table: str, columns: dict[str, list], conflict: str = "") -> None:
        """One INSERT of many rows through Arrow (far cheaper than a statement per row)."""
        if not next(iter(columns.values())):
            return
        with self._table("new_rows", pa.table(columns)):
            self.db.execute(f"INSERT {conflict} INTO {table} BY NAME SELECT * FROM new_rows")

    def _write_updates(self, writes: CycleWrites) -> None:
        """Every user's consent, deletions, catalogue and contributions."""
        items = sorted(writes.updates.items())
        versions = {v.user_id: v.version for v in writes.versions}
        self._insert("consent", {
            "user_id": [u for u, up in items for _ in up.consent],
            "scope_key": [k for _, up in items for k in up.consent],
            "enabled": [r.enabled for _, up in items for r in up.consent.values()],
            "event_time": [r.event_time for _, up in items for r in up.consent.values()],
            "event_id": [r.event_id for _, up in items for r in up.consent.values()]}, "OR REPLACE")
        gone = {"user_id": [u for u, up in items for _ in up.tombstones],
                "photo_id": [p for _, up in items for p in up.tombstones],
                "deleted_at": [t for _, up in items for t in up.tombstones.values()]}
        self._insert("tombstones", gone, "OR IGNORE")
        self._delete("photos", gone["user_id"], gone["photo_id"])
        self._insert("photos", {
            "user_id": [u for u, up in items for _ in up.catalog],
            "photo_id": [c.photo_id for _, up in items for c in up.catalog],
            "album_id": [c.album_id for _, up in items for c in up.catalog],
            "upload": [c.upload.model_dump_json(exclude_none=True) for _, up in items for c in up.catalog]},
            "OR IGNORE")
        self._delete("contributions", [u for u, up in items for _ in up.remove],
                     [p for _, up in items for p in up.remove])
        added = [(u, c, w) for u, up in items for c, w in up.add]
        self._insert("contributions", {
            "added_version": [versions[u] for u, _, _ in added],
            "user_id": [u for u, _, _ in added], "photo_id": [c.photo_id for _, c, _ in added],
            "album_id": [c.album_id for _, c, _ in added], "taken_at": [c.taken_at for _, c, _ in added],
            "weight": [w for _, _, w in added], "embedding": [c.embedding.tolist() for _, c, _ in added],
            "features": [c.features.tolist() for _, c, _ in added],
            "metadata": [json.dumps(c.metadata) for _, c, _ in added],
            "sha256": [c.sha256 for _, c, _ in added], "on_device": [c.on_device for _, c, _ in added]})

    def _write_versions(self, cycle: int, now: datetime, versions: list[NewVersion]) -> None:
        """The users' new sums and their new immutable style versions."""
        self._insert("user_stats", {
            "user_id": [v.user_id for v in versions], "version": [v.version for v in versions],
            "photo_count": [v.stats.count for v in versions],
            "total_weight": [v.stats.total_weight for v in versions],
            "sum_embedding": [v.stats.sum_embedding.tolist() for v in versions],
            "sum_features": [v.stats.sum_features.tolist() for v in versions]}, "OR REPLACE")
        rows = [v.row(cycle, now) for v in versions]
        self._insert("style_versions", {name: [r[name] for r in rows] for name in STYLE_HISTORY.names})

    def _write_redactions(self, cycle: int, redactions: list[Redaction]) -> None:
        """Withdrawn photos must stop influencing anything, the user's past versions included: the
        versions that counted them are deleted here and, after the commit, from the Parquet history."""
        ranges = {"cycle": [cycle] * len(redactions), "user_id": [r.user_id for r in redactions],
                  "from_version": [r.from_version for r in redactions],
                  "to_version": [r.to_version for r in redactions]}
        self._insert("redactions", ranges)
        if redactions:
            with self._table("tainted", pa.table(ranges)):
                self.db.execute(f"""DELETE FROM style_versions WHERE rowid IN (
                    WITH s AS MATERIALIZED {of_users('style_versions', 'rowid AS r, user_id, version')}
                    SELECT r FROM s JOIN tainted t ON s.user_id = t.user_id
                                  AND s.version BETWEEN t.from_version AND t.to_version)""",
                                {"users": ranges["user_id"]})

    def _erase(self, cycle: int, erasures: list[Erasure], subjects: dict[str, str],
               now: datetime) -> list[tuple[str, bytes, bytes | None]]:
        """Delete every row of these people (their history and release-ledger rows follow after the
        commit, then the receipts), and remember each by a keyed hash of their id with the time of the
        request, so their earlier events arriving late count for nothing. Returns the tombstones."""
        if not erasures:
            return []
        users = [e.user_id for e in erasures]
        counts: dict[str, dict[str, int]] = {u: {} for u in users}
        for table, kind in PERSONAL_TABLES.items():
            for u, n in self.db.execute(f"SELECT user_id, count(*) FROM {table} WHERE list_contains($u, user_id) "
                                        "GROUP BY user_id", {"u": users}).fetchall():
                counts[u][kind] = n
            self.db.execute(f"DELETE FROM {table} WHERE list_contains($u, user_id)", {"u": users})
        self._insert("forgotten", {"subject": [subjects[u] for u in users],
                                   "forgotten_at": [e.forgotten_at for e in erasures],
                                   "version": [e.tombstone_version for e in erasures]}, "OR REPLACE")
        for e in erasures:
            self.receipts.open(cycle, e.notice(counts[e.user_id]), e.user_id, e.tombstone_version)
        # The deleted rows stay in the file's free blocks until it is rewritten, after the erasure's
        # outside-state steps have deleted the last rows naming them (pending_erasures).
        self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", [COMPACTION_DUE, now.isoformat()])
        return [m for e in erasures for m in e.messages(counts[e.user_id], now)]

    def _write_outbox(self, cycle: int, messages: list[tuple[str, bytes | None, bytes | None]]) -> None:
        self._insert("outbox", {"cycle": [cycle] * len(messages), "seq": list(range(len(messages))),
                                "topic": [t for t, _, _ in messages], "key": [k for _, k, _ in messages],
                                "value": [v for _, _, v in messages]})

    def _delete(self, table: str, users: list[str], photo_ids: list[str]) -> None:
        if users:
            with self._table("doomed", pa.table({"user_id": users, "photo_id": photo_ids})):
                self.db.execute(f"""DELETE FROM {table} WHERE rowid IN (
                    WITH t AS MATERIALIZED {of_users(table, 'rowid AS r, user_id, photo_id')}
                    SELECT r FROM t SEMI JOIN doomed d ON t.user_id = d.user_id AND t.photo_id = d.photo_id)""",
                                {"users": sorted(set(users))})

    def _uploads(self, keys: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
        """The catalogued upload events of these (user, photo) pairs, to publish again for re-embedding."""
        if not keys:
            return []
        with self._table("wanted", pa.table({"user_id": [u for u, _ in keys], "photo_id": [p for _, p in keys]})):
            rows = self.db.execute(f"""WITH t AS MATERIALIZED {of_users('photos')}
                                       SELECT t.user_id, t.upload FROM t SEMI JOIN wanted w
                                       ON w.user_id = t.user_id AND w.photo_id = t.photo_id
                                       ORDER BY t.user_id, t.photo_id""",
                                   {"users": sorted({u for u, _ in keys})}).fetchall()
        return [(u, upload.encode()) for u, upload in rows]

    # --------------------------------------------------------------------------------- after the commit
    def rewrite(self) -> Store:
        """This database copied to a fresh file in its place (this one closed): no erased row survives
        in the file's free blocks. Until the copy is in place the flag stays set."""
        rewrite_database(self.db, self.path, "DELETE FROM fresh.meta WHERE key = ?", [COMPACTION_DUE])
        return Store(self.path)

    def unpublished_cycles(self) -> list[int]:
        return [c for (c,) in self.db.execute(
            "SELECT cycle FROM cycles WHERE NOT published ORDER BY cycle").fetchall()]

    def outbox(self, cycle: int) -> list[tuple[str, bytes | None, bytes | None]]:
        return self.db.execute("SELECT topic, key, value FROM outbox WHERE cycle = ? ORDER BY seq",
                               [cycle]).fetchall()

    def mark_published(self, cycle: int) -> None:
        self.db.execute("BEGIN TRANSACTION")
        self.db.execute("UPDATE cycles SET published = true WHERE cycle = ?", [cycle])
        self.db.execute("DELETE FROM outbox WHERE cycle = ?", [cycle])
        self.db.execute("COMMIT")

    def unwritten_history(self) -> list[int]:
        return [c for (c,) in self.db.execute(
            "SELECT cycle FROM cycles WHERE NOT history_written ORDER BY cycle").fetchall()]

    def history_rows(self, cycle: int) -> pa.Table:
        table = self.db.sql("""
            SELECT user_id, version, cycle, updated_at, photo_count, total_weight, embedding, features, facets,
                   tombstone
            FROM style_versions WHERE cycle = ?""", params=[cycle]).to_arrow_table()
        return table.cast(STYLE_HISTORY)

    def rewrite_due(self, batch_s: float) -> bool:
        """Whether erased rows have waited `batch_s` seconds for the file's rewrite (any at all, with 0)."""
        due = self.compaction_due()
        return due is not None and (datetime.now(UTC) - due).total_seconds() >= batch_s

    def compaction_due(self) -> datetime | None:
        """Since when erased rows wait for the file's rewrite; None if none do."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [COMPACTION_DUE]).fetchone()
        if row is None:
            return None
        # A state written before the time was kept says 'true': due since long ago.
        return datetime.fromisoformat(row[0]) if row[0] != "true" else datetime.min.replace(tzinfo=UTC)

    def pending_redactions(self) -> list[tuple[int, str, int, int]]:
        return self.db.execute("""SELECT cycle, user_id, from_version, to_version FROM redactions
                                  WHERE NOT applied ORDER BY cycle, user_id""").fetchall()

    def mark_redacted(self, cycles: list[int]) -> None:
        self.db.execute("UPDATE redactions SET applied = true WHERE list_contains(?, cycle)", [cycles])

    def committed_at(self, cycle: int) -> datetime:
        return self.db.execute("SELECT committed_at FROM cycles WHERE cycle = ?", [cycle]).fetchone()[0]

    def mark_history_written(self, cycle: int) -> None:
        self.db.execute("UPDATE cycles SET history_written = true WHERE cycle = ?", [cycle])
