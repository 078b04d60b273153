"""The API's own small database (SQLite): grants, the generations it was asked for, and a read model
of each person's photos, switches, style and manifest, folded from the topics by `follower.py`.

The API never opens ingestion's DuckDB state (one writer process); what it shows comes from the
topics, applied here together with the offsets they came from, so a restart resumes exactly where
the last committed fold stopped.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stylestream.analytics.pseudonyms import load_key, new_key, subject
from stylestream.keyfiles import create_once
from stylestream.transforms.style import ConsentRecord

FORGOTTEN_KEY_FILE = "forgotten.key"
SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, name TEXT NOT NULL, scopes TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL, revoked_at TEXT);
CREATE INDEX IF NOT EXISTS grants_by_user ON grants (user_id);
CREATE TABLE IF NOT EXISTS generations (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, grant_id TEXT, trace_id TEXT NOT NULL,
    prompt TEXT NOT NULL, size TEXT NOT NULL, response_format TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS generations_by_user ON generations (user_id, created_at);
CREATE TABLE IF NOT EXISTS images (
    request_id TEXT PRIMARY KEY, generation_id TEXT NOT NULL, user_id TEXT NOT NULL, idx INTEGER NOT NULL,
    result TEXT);
CREATE INDEX IF NOT EXISTS images_by_generation ON images (generation_id, idx);
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, grant_id TEXT, trace_id TEXT NOT NULL, prompt TEXT NOT NULL,
    size TEXT NOT NULL, seconds TEXT NOT NULL, fps INTEGER NOT NULL, frames INTEGER NOT NULL, motion TEXT NOT NULL,
    started_from_image INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS videos_by_user ON videos (user_id, created_at, id);
CREATE TABLE IF NOT EXISTS previews (
    request_id TEXT NOT NULL, idx INTEGER NOT NULL, user_id TEXT NOT NULL, image_uri TEXT NOT NULL,
    PRIMARY KEY (request_id, idx));
CREATE TABLE IF NOT EXISTS photos (
    user_id TEXT NOT NULL, photo_id TEXT NOT NULL, album_id TEXT, uploaded_at TEXT NOT NULL,
    on_device INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, photo_id));
CREATE TABLE IF NOT EXISTS consent (
    user_id TEXT NOT NULL, scope_key TEXT NOT NULL, enabled INTEGER NOT NULL, event_time TEXT NOT NULL,
    event_id TEXT NOT NULL, PRIMARY KEY (user_id, scope_key));
CREATE TABLE IF NOT EXISTS style_versions (
    user_id TEXT NOT NULL, version INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (user_id, version));
CREATE TABLE IF NOT EXISTS manifest_versions (
    user_id TEXT NOT NULL, version INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (user_id, version));
CREATE TABLE IF NOT EXISTS forgotten (subject TEXT PRIMARY KEY, forgotten_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (topic TEXT NOT NULL, part INTEGER NOT NULL, next INTEGER NOT NULL,
    PRIMARY KEY (topic, part));
"""
PERSONAL_TABLES = ("grants", "generations", "videos", "images", "previews", "photos", "consent", "style_versions",
                   "manifest_versions")
# An older read model's tables, copied into their successors (in one transaction) and dropped.
MIGRATIONS = {
    "switches": """INSERT OR REPLACE INTO consent SELECT user_id, CASE scope WHEN 'user' THEN 'user:'
                   ELSE scope || ':' || scope_id END, enabled, changed_at, '' FROM switches""",
    "styles": "INSERT OR IGNORE INTO style_versions SELECT user_id, version, event FROM styles",
    "manifests": "INSERT OR IGNORE INTO manifest_versions SELECT user_id, version, event FROM manifests",
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Grant:
    id: str
    user_id: str
    name: str
    scopes: tuple[str, ...]
    secret_sha256: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    def live(self, at: datetime) -> bool:
        return self.revoked_at is None and at < self.expires_at

    def public(self) -> dict:
        """What the person sees of a grant (never the secret or its hash)."""
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes),
                "created_at": self.created_at.isoformat(), "expires_at": self.expires_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


def _grant(row: sqlite3.Row) -> Grant:
    return Grant(row["id"], row["user_id"], row["name"], tuple(row["scopes"].split()), row["secret_sha256"],
                 datetime.fromisoformat(row["created_at"]), datetime.fromisoformat(row["expires_at"]),
                 datetime.fromisoformat(row["revoked_at"]) if row["revoked_at"] else None)


class ApiStore:
    """One SQLite connection shared by the request threads and the follower, behind one lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # The key of the hash a forgotten person is kept under, beside the database.
        create_once(path.with_name(FORGOTTEN_KEY_FILE), new_key())
        self._key = load_key(path.with_name(FORGOTTEN_KEY_FILE))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA busy_timeout = 10000")  # replicas sharing the data dir wait for each other
            # A forgotten person's deleted rows are overwritten, not left in free pages (see `forget`).
            self._db.execute("PRAGMA secure_delete = ON")
            self._db.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(photos)")}
        if "on_device" not in columns:  # a read model from before devices' contributions
            self._db.execute("ALTER TABLE photos ADD COLUMN on_device INTEGER NOT NULL DEFAULT 0")
        old = [t for t in MIGRATIONS if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", [t]).fetchone()]
        if old:
            with self.transaction() as db:
                for table in old:
                    db.execute(MIGRATIONS[table])
                    db.execute(f"DROP TABLE {table}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT leaves it open too
                    self._db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # --- grants ---------------------------------------------------------------------------------
    def add_grant(self, grant: Grant) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                       (grant.id, grant.user_id, grant.name, " ".join(grant.scopes), grant.secret_sha256,
                        grant.created_at.isoformat(), grant.expires_at.isoformat()))

    def grant(self, grant_id: str) -> Grant | None:
        rows = self._rows("SELECT * FROM grants WHERE id = ?", [grant_id])
        return _grant(rows[0]) if rows else None

    def grants_of(self, user_id: str) -> list[Grant]:
        return [_grant(r) for r in self._rows(
            "SELECT * FROM grants WHERE user_id = ? ORDER BY created_at DESC", [user_id])]

    def revoke_grant(self, user_id: str, grant_id: str) -> bool:
        """Revoke one of the person's grants; False if they have none with that id."""
        with self.transaction() as db:
            cur = db.execute("UPDATE grants SET revoked_at = coalesce(revoked_at, ?) WHERE id = ? AND user_id = ?",
                             (now_iso(), grant_id, user_id))
            return cur.rowcount == 1

    # --- generations ----------------------------------------------------------------------------
    def add_generation(self, generation_id: str, user_id: str, grant_id: str | None, trace_id: str, prompt: str,
                       size: str, response_format: str, request_ids: list[str]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (generation_id, user_id, grant_id, trace_id, prompt, size, response_format, now_iso()))
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, NULL)",
                           [(r, generation_id, user_id, i) for i, r in enumerate(request_ids)])

    def generation(self, generation_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM generations WHERE id = ?", [generation_id])
        return {**dict(rows[0]), "images": self._results(generation_id)} if rows else None

    def _results(self, generation_id: str) -> list[tuple[str, dict | None]]:
        """(request id, result event or None while pending) of a generation's or a video's requests."""
        return [(r["request_id"], json.loads(r["result"]) if r["result"] else None) for r in self._rows(
            "SELECT request_id, result FROM images WHERE generation_id = ? ORDER BY idx", [generation_id])]

    def generations_of(self, user_id: str, limit: int = 50) -> list[dict]:
        ids = [r["id"] for r in self._rows(
            "SELECT id FROM generations WHERE user_id = ? ORDER BY created_at DESC LIMIT ?", [user_id, limit])]
        return [g for g in map(self.generation, ids) if g is not None]

    def image_owner(self, request_id: str) -> tuple[str, dict | None] | None:
        """(owner, result) of an image of a generation (a video's clip is not an image)."""
        rows = self._rows("""SELECT i.user_id, i.result FROM images i JOIN generations g ON g.id = i.generation_id
                             WHERE i.request_id = ?""", [request_id])
        return (rows[0]["user_id"], json.loads(rows[0]["result"]) if rows[0]["result"] else None) if rows else None

    def previews(self, generation_id: str) -> list[tuple[str, int, str]]:
        """(request id, preview index, image URI) of a generation's previews so far, in order."""
        return [(r["request_id"], r["idx"], r["image_uri"]) for r in self._rows(
            """SELECT p.request_id, p.idx, p.image_uri FROM previews p JOIN images i USING (request_id)
               WHERE i.generation_id = ? ORDER BY i.idx, p.idx""", [generation_id])]

    # --- videos (a clip is one request: its result is the `images` row under the video's id) -------
    def add_video(self, video: dict, user_id: str, grant_id: str | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO videos VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                video["id"], user_id, grant_id, video["trace_id"], video["prompt"], video["size"], video["seconds"],
                video["fps"], video["frames"], video["motion"], int(video["started_from_image"]), now_iso()))
            db.execute("INSERT INTO images VALUES (?, ?, ?, 0, NULL)", (video["id"], video["id"], user_id))

    def video(self, video_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM videos WHERE id = ?", [video_id])
        return {**dict(rows[0]), "images": self._results(video_id)} if rows else None

    def videos_of(self, user_id: str, limit: int, after: str | None = None, newest_first: bool = True) -> list[dict]:
        """The person's videos, newest (or oldest) first, from the one after `after` (a video id of theirs)."""
        order, before = ("DESC", "<") if newest_first else ("ASC", ">")
        where, params = "user_id = ?", [user_id]
        if after is not None:
            where += f" AND (created_at, id) {before} (SELECT created_at, id FROM videos WHERE id = ? AND user_id = ?)"
            params += [after, user_id]
        sql = f"SELECT id FROM videos WHERE {where} ORDER BY created_at {order}, id {order} LIMIT ?"
        ids = [r["id"] for r in self._rows(sql, [*params, limit])]
        return [v for v in map(self.video, ids) if v is not None]

    def delete_video(self, user_id: str, video_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM videos WHERE id = ? AND user_id = ?", (video_id, user_id))
            db.execute("DELETE FROM images WHERE generation_id = ? AND user_id = ?", (video_id, user_id))

    def fail_generation(self, generation_id: str, reason: str) -> None:
        """Its images that have no result yet fail with `reason` (their requests were never published)."""
        with self.transaction() as db:
            db.execute("""UPDATE images SET result = json_object('type', 'generation_failed', 'request_id', request_id,
                                                              'reason', ?)
                          WHERE generation_id = ? AND result IS NULL""", (reason, generation_id))

    # --- the read model -------------------------------------------------------------------------
    def offsets(self) -> dict[tuple[str, int], int]:
        return {(r["topic"], r["part"]): r["next"] for r in self._rows("SELECT * FROM offsets")}

    def style(self, user_id: str) -> dict | None:
        """The newest style whose manifest is folded too (the two topics are read apart)."""
        return self._of_shown_version("style_versions", user_id)

    def manifest(self, user_id: str) -> dict | None:
        """The manifest of `style`'s version: what the page shows together is of one version."""
        return self._of_shown_version("manifest_versions", user_id)

    def _of_shown_version(self, table: str, user_id: str) -> dict | None:
        rows = self._rows(f"""SELECT t.event FROM {table} t WHERE t.user_id = ? AND t.version = (
            SELECT MAX(s.version) FROM style_versions s JOIN manifest_versions m USING (user_id, version)
            WHERE s.user_id = ?)""", [user_id, user_id])
        return json.loads(rows[0]["event"]) if rows else None

    def fold_version(self, db: sqlite3.Connection, table: str, user_id: str, version: int, event: str) -> None:
        """One style or manifest version, in the caller's transaction; versions older than the newest
        one both tables hold are no longer shown, and go."""
        db.execute(f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?)", (user_id, version, event))
        shown = db.execute("""SELECT MAX(s.version) FROM style_versions s JOIN manifest_versions m
                              USING (user_id, version) WHERE s.user_id = ?""", (user_id,)).fetchone()[0]
        if shown is not None:
            for t in ("style_versions", "manifest_versions"):
                db.execute(f"DELETE FROM {t} WHERE user_id = ? AND version < ?", (user_id, shown))

    def fold_consent(self, db: sqlite3.Connection, user_id: str, key: str, record: ConsentRecord) -> None:
        """A style-learning switch, by ingestion's rule (`ConsentRecord.supersedes`: the later event
        time wins, in UTC whatever the offsets; the event id breaks a tie)."""
        row = db.execute("SELECT enabled, event_time, event_id FROM consent WHERE user_id = ? AND scope_key = ?",
                         (user_id, key)).fetchone()
        held = ConsentRecord(bool(row[0]), datetime.fromisoformat(row[1]), row[2]) if row else None
        if record.supersedes(held):
            db.execute("INSERT OR REPLACE INTO consent VALUES (?, ?, ?, ?, ?)", (
                user_id, key, int(record.enabled), record.event_time.astimezone(UTC).isoformat(), record.event_id))

    def photos(self, user_id: str) -> list[dict]:
        return [dict(r) for r in self._rows(
            "SELECT photo_id, album_id, uploaded_at, on_device = 1 AS on_device FROM photos WHERE user_id = ? "
            "ORDER BY album_id, photo_id",
            [user_id])]

    def device_photos(self, user_id: str) -> list[str]:
        """The ids of the person's catalogued photos that their device analysed."""
        return [r["photo_id"] for r in self._rows(
            "SELECT photo_id FROM photos WHERE user_id = ? AND on_device = 1 ORDER BY photo_id", [user_id])]

    def basis(self) -> dict | None:
        """The basis the service's styles are computed with (every manifest names the same), if any is
        folded yet: what a device must compute with."""
        rows = self._rows("SELECT event FROM manifest_versions LIMIT 1")
        return json.loads(rows[0]["event"])["basis"] if rows else None

    def consent(self, user_id: str) -> dict[str, ConsentRecord]:
        """The person's switches by scope key (`transforms.style.scope_key`), as ingestion holds them."""
        return {r["scope_key"]: ConsentRecord(bool(r["enabled"]), datetime.fromisoformat(r["event_time"]),
                                              r["event_id"])
                for r in self._rows("SELECT * FROM consent WHERE user_id = ?", [user_id])}

    def forgotten_at(self, db: sqlite3.Connection, user_id: str) -> datetime | None:
        """When the person asked to be forgotten: what they sent before counts for nothing."""
        row = db.execute("SELECT forgotten_at FROM forgotten WHERE subject = ?",
                         (subject(user_id, self._key),)).fetchone()
        return datetime.fromisoformat(row[0]) if row else None

    def forget(self, db: sqlite3.Connection, user_id: str, at: datetime | None = None) -> None:
        """Every row of the person, in the caller's transaction (a forget request or an erasure
        tombstone); `checkpoint` after the commit leaves no copy of them in the write-ahead log. With
        the request's time, that time is kept under a keyed hash of the person (as ingestion keeps it),
        so that their earlier events arriving late are voided."""
        for table in PERSONAL_TABLES:
            db.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
        if at is not None:
            at = max(at.astimezone(UTC), self.forgotten_at(db, user_id) or at.astimezone(UTC))
            db.execute("INSERT OR REPLACE INTO forgotten VALUES (?, ?)", (subject(user_id, self._key), at.isoformat()))

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the file and empty it: with secure_delete, nothing deleted
        stays readable in either."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
