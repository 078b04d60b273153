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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from stylestream.schemas.events import StyleFacet, StyleVectorUpdated, encode_event
from stylestream.schemas.tables import FEATURE_NAMES, STYLE_HISTORY
from stylestream.streams.topics import PHOTO_EVENTS, STYLE_VECTORS, dlq
from stylestream.transforms.facets import Facet, find_facets
from stylestream.transforms.kafka_read import OffsetRange
from stylestream.transforms.records import DeadLetter, UserBatch
from stylestream.transforms.style import (
    ConsentRecord,
    StoredContribution,
    StyleStats,
    UserUpdate,
    UserView,
    affected_scopes,
    plan_user_update,
)

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
    PRIMARY KEY (user_id, photo_id));
CREATE TABLE IF NOT EXISTS user_stats (
    user_id VARCHAR PRIMARY KEY, version BIGINT NOT NULL, photo_count BIGINT NOT NULL,
    total_weight DOUBLE NOT NULL, sum_embedding DOUBLE[] NOT NULL, sum_features DOUBLE[] NOT NULL);
CREATE TABLE IF NOT EXISTS style_versions (
    user_id VARCHAR, version BIGINT, cycle BIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL,
    photo_count BIGINT NOT NULL, total_weight DOUBLE NOT NULL, embedding FLOAT[] NOT NULL,
    features FLOAT[] NOT NULL,
    facets STRUCT(photo_count BIGINT, total_weight DOUBLE, embedding FLOAT[], features FLOAT[])[] NOT NULL,
    tombstone BOOLEAN NOT NULL, PRIMARY KEY (user_id, version));
CREATE TABLE IF NOT EXISTS outbox (
    cycle BIGINT NOT NULL, seq BIGINT NOT NULL, topic VARCHAR NOT NULL, key BLOB, value BLOB NOT NULL,
    PRIMARY KEY (cycle, seq));
"""


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class CycleResult:
    cycle: int
    events: int
    photos: int  # uploads among the events
    dead_letters: int
    users_updated: int
    lag: int | None = None  # events left on the input topics when the cycle was planned, after it


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = duckdb.connect(str(self.path))
            self.db.execute(SCHEMA)
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

    def _many(self, sql: str, rows: list) -> None:
        if rows:  # DuckDB refuses an empty parameter list
            self.db.executemany(sql, rows)

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

    def check_model(self, clip_model: str, embedding_dim: int) -> None:
        """Remember the embedding model on first use; refuse to mix vectors of two models."""
        want = {"clip_model": clip_model, "embedding_dim": str(embedding_dim),
                "features": ",".join(FEATURE_NAMES)}
        have = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        clash = {k: (have[k], v) for k, v in want.items() if k in have and have[k] != v}
        if clash:
            raise StoreError(f"{self.path} holds style state of another model or feature set {clash} "
                             "(stored, configured); use a new state directory for a new model")
        self._many("INSERT OR IGNORE INTO meta VALUES (?, ?)", list(want.items()))

    def latest_vectors(self) -> dict[str, tuple[int, np.ndarray, np.ndarray, int]]:
        """user_id -> (version, embedding, features, photo_count) of each user's latest version."""
        rows = self.db.execute("""
            SELECT user_id, version, embedding, features, photo_count FROM style_versions
            QUALIFY version = max(version) OVER (PARTITION BY user_id)""").fetchall()
        return {u: (v, np.array(e, np.float32), np.array(f, np.float32), n) for u, v, e, f, n in rows}

    def contributions(self, user_id: str) -> list[tuple[str, str | None, float, np.ndarray, np.ndarray]]:
        rows = self.db.execute("""SELECT photo_id, album_id, weight, embedding, features FROM contributions
                                  WHERE user_id = ? ORDER BY photo_id""", [user_id]).fetchall()
        return [(p, a, w, np.array(e, np.float32), np.array(f, np.float32)) for p, a, w, e, f in rows]

    def _view(self, batch: UserBatch, dim: int) -> UserView:
        u = batch.user_id
        row = self.db.execute("""SELECT version, photo_count, total_weight, sum_embedding, sum_features
                                 FROM user_stats WHERE user_id = ?""", [u]).fetchone()
        if row is None:
            stats, version = StyleStats.zero(dim, len(FEATURE_NAMES)), 0
        else:
            version, count, weight, se, sf = row
            stats = StyleStats(np.array(se, np.float64), np.array(sf, np.float64), weight, count)
        consent = {k: ConsentRecord(e, t, i) for k, e, t, i in self.db.execute(
            "SELECT scope_key, enabled, event_time, event_id FROM consent WHERE user_id = ?", [u]).fetchall()}
        photos, albums, whole_user = affected_scopes(batch)
        stored = {p: StoredContribution(a, w, np.array(e, np.float32), np.array(f, np.float32))
                  for p, a, w, e, f in self.db.execute("""
                      SELECT photo_id, album_id, weight, embedding, features FROM contributions
                      WHERE user_id = ? AND (? OR list_contains(?, photo_id) OR list_contains(?, album_id))""",
                      [u, whole_user, sorted(photos), sorted(albums)]).fetchall()}
        deleted = {p for (p,) in self.db.execute(
            "SELECT photo_id FROM tombstones WHERE user_id = ? AND list_contains(?, photo_id)",
            [u, sorted(photos)]).fetchall()}
        catalog = dict(self.db.execute("""
            SELECT photo_id, album_id FROM photos
            WHERE user_id = ? AND (? OR list_contains(?, photo_id) OR list_contains(?, album_id))""",
            [u, whole_user, sorted(photos), sorted(albums)]).fetchall())
        return UserView(stats, version, consent, stored, deleted, catalog)

    # --------------------------------------------------------------------------------- the commit
    def commit_cycle(self, cycle: int, ranges: Iterable[OffsetRange], batches: Iterable[UserBatch],
                     dead_letters: Iterable[DeadLetter], half_life_days: float, embedding_dim: int) -> CycleResult:
        """Apply one cycle's user batches and record its offsets, atomically."""
        ranges, batches, dead_letters = list(ranges), list(batches), list(dead_letters)
        events = sum(len(r) for r in ranges)
        self.db.execute("BEGIN TRANSACTION")
        try:
            stored = self.offsets()
            if ranges and all(stored.get((r.topic, r.partition)) == r.stop for r in ranges) and \
                    self.db.execute("SELECT 1 FROM cycles WHERE cycle = ?", [cycle]).fetchone():
                self.db.execute("ROLLBACK")  # a runner retried the commit: it is already in
                return self.cycle_result(cycle)
            for r in ranges:
                if stored.get((r.topic, r.partition), 0) != r.start:
                    raise StoreError(f"{r.topic}[{r.partition}] is at offset {stored.get((r.topic, r.partition), 0)},"
                                     f" the cycle starts at {r.start}: another writer ran in between")
            now = datetime.now(UTC)
            outbox: list[tuple[str, bytes | None, bytes]] = []
            updated = 0
            for batch in sorted(batches, key=lambda b: b.user_id):
                view = self._view(batch, embedding_dim)
                update = plan_user_update(view, batch, half_life_days)
                applied = self._apply(batch.user_id, view, update, cycle, now)
                outbox += [(PHOTO_EVENTS, batch.user_id.encode(), upload) for upload in self._uploads(
                    batch.user_id, update.reingest)]
                if applied is not None:
                    updated += 1
                    outbox.append((STYLE_VECTORS, batch.user_id.encode(),
                                   self._vector_event(batch.user_id, *applied, update.stats, now)))
            outbox += [(dlq(d.topic), d.key, d.to_json()) for d in dead_letters]
            self._many("INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
                                [(cycle, i, t, k, v) for i, (t, k, v) in enumerate(outbox)])
            self._many("INSERT OR REPLACE INTO offsets VALUES (?, ?, ?)",
                                [(r.topic, r.partition, r.stop) for r in ranges])
            photos = sum(len(b.uploads) for b in batches)
            self.db.execute("INSERT INTO cycles VALUES (?, ?, ?, ?, ?, ?, false, false)",
                            [cycle, now, events, photos, len(dead_letters), updated])
            self.db.execute("COMMIT")
        except (duckdb.IOException, duckdb.TransactionException) as e:  # a failed write fails the commit
            with contextlib.suppress(duckdb.Error):
                self.db.execute("ROLLBACK")
            raise StoreError(f"cannot write the state database {self.path} (disk full?): {e}; nothing of cycle "
                             f"{cycle} was committed and everything before it is intact") from e
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return CycleResult(cycle, events, photos, len(dead_letters), updated)

    def _apply(self, user_id: str, view: UserView, update: UserUpdate, cycle: int,
               now: datetime) -> tuple[int, list[Facet]] | None:
        """Write one user's update; returns the new style version and facets, or None if the style
        did not change."""
        db = self.db
        self._many("INSERT OR REPLACE INTO consent VALUES (?, ?, ?, ?, ?)",
                       [(user_id, k, r.enabled, r.event_time, r.event_id) for k, r in update.consent.items()])
        self._many("INSERT OR IGNORE INTO tombstones VALUES (?, ?, ?)",
                       [(user_id, p, t) for p, t in update.tombstones.items()])
        if update.tombstones:
            db.execute("DELETE FROM photos WHERE user_id = ? AND list_contains(?, photo_id)",
                       [user_id, sorted(update.tombstones)])
        self._many("INSERT OR IGNORE INTO photos VALUES (?, ?, ?, ?)", [
            (user_id, c.photo_id, c.album_id, c.upload.model_dump_json(exclude_none=True)) for c in update.catalog])
        if not update.changes_style:
            return None
        if update.remove:
            db.execute("DELETE FROM contributions WHERE user_id = ? AND list_contains(?, photo_id)",
                       [user_id, update.remove])
        self._many("INSERT INTO contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (user_id, c.photo_id, c.album_id, c.taken_at, w, c.embedding.tolist(), c.features.tolist(),
             json.dumps(c.metadata)) for c, w in update.add])
        s = update.stats
        version = view.version + 1
        db.execute("INSERT OR REPLACE INTO user_stats VALUES (?, ?, ?, ?, ?, ?)",
                   [user_id, version, s.count, s.total_weight, s.sum_embedding.tolist(), s.sum_features.tolist()])
        emb, feat = s.vector()
        facets = self._facets(user_id)
        db.execute("INSERT INTO style_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false)",
                   [user_id, version, cycle, now, s.count, s.total_weight, emb.tolist(), feat.tolist(),
                    [{"photo_count": f.stats.count, "total_weight": f.stats.total_weight,
                      "embedding": f.stats.vector()[0].tolist(), "features": f.stats.vector()[1].tolist()}
                     for f in facets]])
        return version, facets

    def _facets(self, user_id: str) -> list[Facet]:
        rows = self.contributions(user_id)
        if not rows:
            return []
        ids, _, weights, emb, feat = zip(*rows, strict=True)
        return find_facets(list(ids), np.stack(emb), np.stack(feat), np.array(weights))

    def _uploads(self, user_id: str, photo_ids: list[str]) -> list[bytes]:
        """The catalogued upload events of these photos, to publish again for re-embedding."""
        if not photo_ids:
            return []
        rows = self.db.execute("""SELECT upload FROM photos WHERE user_id = ? AND list_contains(?, photo_id)
                                  ORDER BY photo_id""", [user_id, photo_ids]).fetchall()
        return [u.encode() for (u,) in rows]

    @staticmethod
    def _vector_event(user_id: str, version: int, facets: list[Facet], stats: StyleStats, now: datetime) -> bytes:
        def named(feat: np.ndarray) -> dict[str, float]:
            return {n: float(v) for n, v in zip(FEATURE_NAMES, feat, strict=True)}

        emb, feat = stats.vector()
        return encode_event(StyleVectorUpdated(
            event_id=f"{user_id}:v{version}", user_id=user_id, event_time=now, version=version,
            photo_count=stats.count, embedding=emb.tolist(), features=named(feat),
            facets=[StyleFacet(photo_count=f.stats.count,
                               weight_share=min(1.0, f.stats.total_weight / stats.total_weight),
                               embedding=f.stats.vector()[0].tolist(), features=named(f.stats.vector()[1]))
                    for f in facets]))

    # --------------------------------------------------------------------------------- after the commit
    def unpublished_cycles(self) -> list[int]:
        return [c for (c,) in self.db.execute(
            "SELECT cycle FROM cycles WHERE NOT published ORDER BY cycle").fetchall()]

    def outbox(self, cycle: int) -> list[tuple[str, bytes | None, bytes]]:
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
            FROM style_versions WHERE cycle = ? ORDER BY user_id, version""", params=[cycle]).to_arrow_table()
        return table.cast(STYLE_HISTORY)

    def mark_history_written(self, cycle: int) -> None:
        self.db.execute("UPDATE cycles SET history_written = true WHERE cycle = ?", [cycle])
