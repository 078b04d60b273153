"""The Parquet style history on disk: where files go, compaction, and redaction of withdrawn versions.

Layout (hive style, one partition per UTC day of the commit):

    history/date=2026-11-29/cycle-00000042.parquet      one file per committed ingestion cycle
    history/date=2026-11-29/stream-00000042.parquet     ... or per step of the Flink job
    history/date=2026-11-28/compacted-00000001-00000041-users-a.parquet   a closed day after `compact`:
                                                        one file per user bucket (`drift.user_bucket`)
    history/_in_force/date=2026-11-28/in-force.parquet  each person's version in force at that closed
                                                        day's end (`compact`)

A closed day is split by user bucket so that one person's timeline reads one small file per day
(`analytics.drift.versions_of` picks it by name), not a row group out of every person's file.

Every file has the `schemas.tables.STYLE_HISTORY` schema; rows are sorted by user and version, and
each (user_id, version) is one immutable version of a user's style. A cycle's file is written only
after the cycle committed and is rewritten whole under the same name if a crash interrupted that,
so readers see each committed version once (a reader that lists files while a compaction swaps
them may see a version twice; the queries in `analytics.drift` do not count it twice).

Writers that replace files (compaction, redaction) hold `history/.lock`, so neither can bring back
rows the other removed. Ingestion only ever adds new cycle files and needs no lock for that.

The in-force snapshots are what makes a window's drift read a snapshot and the days after it, not
every row before the window (`analytics.drift.in_force_at`). Each is built from the one before it
and the history files since, and records which (`built_from`); `compact` rebuilds one whose inputs
changed (a file added to or merged in its days, or a rebuilt snapshot before it). A redaction
recomputes the snapshot rows of the people it touched, so a withdrawn version or a forgotten person
leaves them too. A version written into a closed day after its snapshot counts from the next `compact`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stylestream.analytics import drift
from stylestream.schemas.tables import IN_FORCE, STYLE_HISTORY

# Small row groups let a query for one user skip most of a file by its user_id statistics. A closed
# day's bucket files hold a sixteenth of its people, so smaller groups there: one person's row costs a
# 1024-row group to decode. (Reading one person's rows from 100 bucket files of 62,500 people each,
# 1024-row groups were 1.7x faster than 512-row groups, which have twice the groups to skip.)
ROW_GROUP_SIZE = 8192
COMPACTED_ROW_GROUP_SIZE = 1024


def cycle_path(history_dir: Path, cycle: int, committed_at: datetime) -> Path:
    day = committed_at.astimezone(UTC).date()
    return history_dir / f"date={day.isoformat()}" / f"cycle-{cycle:08d}.parquet"


def in_force_path(history_dir: Path, day: date) -> Path:
    return history_dir / drift.IN_FORCE_DIR / f"date={day.isoformat()}" / "in-force.parquet"


# A bucket file's name ends in "-users-<bucket>.parquet": `_FILE_NAME`, `built_from` and the
# `versions_of` macro in analytics/drift.py read it so.
def compacted_path(history_dir: Path, day: date, first: int, last: int, bucket: str) -> Path:
    return history_dir / f"date={day.isoformat()}" / f"compacted-{first:08d}-{last:08d}-users-{bucket}.parquet"


_FILE_NAME = re.compile(r"^(?:(?:cycle|stream)-(\d+)|compacted-(\d+)-(\d+)(-users-[0-9a-f])?)\.parquet$")


def cycles_of(path: Path) -> tuple[int, int]:
    """The first and last cycle (or streaming step) whose rows a history file holds, from its name."""
    m = _FILE_NAME.match(path.name)
    if not m:
        raise ValueError(f"not a history file name: {path}")
    return (int(m[1]), int(m[1])) if m[1] else (int(m[2]), int(m[3]))


def is_bucketed(files: list[Path]) -> bool:
    """Whether a day's files are the bucket files of one compaction (so there is nothing to merge)."""
    matches = [_FILE_NAME.match(f.name) for f in files]
    return all(m and m[4] for m in matches) and len({(m[2], m[3]) for m in matches}) == 1


def write_atomically(table: pa.Table, path: Path, schema: pa.Schema = STYLE_HISTORY,
                     row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Readers see the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.cast(schema), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def write_compacted(table: pa.Table, history_dir: Path, day: date, first: int, last: int) -> list[Path]:
    """A closed day's rows (sorted by user and version) as one file per user bucket; returns the files."""
    with duckdb.connect() as db:
        db.execute(drift.USER_BUCKET)
        db.register("day_rows", table.select(["user_id"]))
        # In the table's row order: DuckDB keeps insertion order (preserve_insertion_order, on by default).
        buckets = db.sql("SELECT user_bucket(user_id) AS b FROM day_rows").to_arrow_table().column("b")
    written = []
    for bucket in sorted(pc.unique(buckets).to_pylist()):
        path = compacted_path(history_dir, day, first, last, bucket)
        write_atomically(table.filter(pc.equal(buckets, bucket)), path, row_group_size=COMPACTED_ROW_GROUP_SIZE)
        written.append(path)
    return written


@contextlib.contextmanager
def locked(history_dir: Path) -> Iterator[None]:
    """Held while files are replaced (compaction, redaction); blocks until the other one finishes."""
    history_dir.mkdir(parents=True, exist_ok=True)
    with open(history_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def partition_day(folder: Path) -> date:
    return date.fromisoformat(folder.name.removeprefix("date="))


def day_partitions(history_dir: Path) -> dict[date, list[Path]]:
    days = {}
    for part in sorted(history_dir.glob("date=*")):
        files = sorted(part.glob("*.parquet"))
        if files:
            days[partition_day(part)] = files
    return days


@dataclass(frozen=True)
class Compaction:
    merged: list[tuple[date, int, int]]  # (day, files, rows) per day merged
    snapshots: list[date]  # the days whose in-force snapshot was (re)built


def compact(history_dir: Path, before: date | None = None) -> Compaction:
    """Merge each day's files into one per user bucket, sorted by user and version (a version present
    twice, from a crash repeat, is kept once), for every day before `before` (default: today in UTC;
    ingestion may still be writing today's); days already so are left alone. Then the in-force
    snapshots of the closed days that are due or out of date.

    A crash part way leaves the day's old files beside some bucket files; the next `compact` merges
    them all again (the same names: the same cycles)."""
    before = before or datetime.now(UTC).date()
    done = []
    with locked(history_dir), duckdb.connect() as db:
        for day, files in day_partitions(history_dir).items():
            if day >= before or is_bucketed(files):
                continue
            table = db.sql("""SELECT DISTINCT ON (user_id, version) *
                              FROM read_parquet($files, hive_partitioning = false) ORDER BY user_id, version""",
                           params={"files": [str(f) for f in files]}).to_arrow_table()
            cycles = [cycles_of(f) for f in files]
            merged = write_compacted(table, history_dir, day, min(a for a, _ in cycles), max(b for _, b in cycles))
            for f in files:
                if f not in merged:
                    f.unlink()
            done.append((day, len(files), table.num_rows))
        snapshots = update_in_force(history_dir, before)
    return Compaction(done, snapshots)


def end_of(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(), UTC) - timedelta(microseconds=1)


BUILT_FROM = b"stylestream.built_from"  # a snapshot's metadata: what it was built from (`built_from`)


def built_from(previous: str, history_dir: Path, files: list[Path]) -> str:
    """A snapshot's inputs: what the one before it was built from, and the names of the history files
    since, a day's bucket files under one (what they were merged from). A file added or merged
    since changes it, and so does a rebuilt snapshot before it. A redaction rewrites files under
    their names, or removes a bucket file it empties: that changes nothing here (`refresh_in_force`
    has already brought the snapshots in step), unless it removed a day's last file: then `compact`
    writes that day's snapshot and the later ones again, for nothing."""
    names = sorted({f.relative_to(history_dir).as_posix().split("-users-")[0] for f in files})
    return hashlib.sha256("\n".join([previous, *names]).encode()).hexdigest()


def update_in_force(history_dir: Path, before: date) -> list[date]:
    """Writes the in-force snapshots due among the closed days (before `before`), oldest first; returns
    their days. A snapshot is due once the history rows since the one before are as many as the
    people in it: so the snapshots never outgrow the history. One whose inputs (`built_from`) have
    changed is written again, and so is each one after it, whose inputs include it."""
    written = []
    previous, since, rows_since, people = "", [], 0, 0
    for day, files in sorted(day_partitions(history_dir).items()):  # listed first: a file landing later is new
        if day >= before:
            break
        since += files
        rows_since += sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        inputs = built_from(previous, history_dir, since)
        snapshot = in_force_path(history_dir, day)
        if snapshot.exists():
            if (pq.read_schema(snapshot).metadata or {}).get(BUILT_FROM) != inputs.encode():
                write_in_force(history_dir, day, inputs)
                written.append(day)
        elif rows_since >= max(people, 1):
            write_in_force(history_dir, day, inputs)
            written.append(day)
        else:
            continue
        previous, since, rows_since, people = inputs, [], 0, pq.ParquetFile(snapshot).metadata.num_rows
    return written


def write_in_force(history_dir: Path, day: date, inputs: str, users: list[str] | None = None) -> None:
    """Writes the in-force snapshot of this day from the one before and the history since. With
    `users`, only their rows are recomputed and everyone else's kept (after a redaction)."""
    with drift.connect(history_dir) as db:
        db.execute("SET parquet_metadata_cache = false")  # it reads files rewritten since
        if users is None:
            table = db.sql("SELECT * FROM in_force_at($t) ORDER BY user_id", params={"t": end_of(day)})
        else:
            table = db.sql("""SELECT * EXCLUDE (date) FROM in_force
                              WHERE date = $day AND user_id NOT IN (SELECT unnest($u))
                              UNION ALL SELECT * FROM in_force_at($t) WHERE user_id IN (SELECT unnest($u))
                              ORDER BY user_id""", params={"t": end_of(day), "day": day, "u": users})
        write_atomically(table.to_arrow_table(), in_force_path(history_dir, day),
                         IN_FORCE.with_metadata({BUILT_FROM: inputs.encode()}))


def refresh_in_force(history_dir: Path, users: list[str]) -> None:
    """Recomputes these people's rows in every snapshot that holds them, from the history as it is now."""
    folder = history_dir / drift.IN_FORCE_DIR
    snapshots = sorted(str(f) for f in folder.glob("date=*/*.parquet"))
    if not snapshots or not users:
        return
    if not any(history_dir.glob("date=*/*.parquet")):
        shutil.rmtree(folder)  # no history: no one is in force
        return
    with duckdb.connect() as db:
        holding = db.execute("SELECT DISTINCT filename FROM read_parquet($files, filename = true) "
                             "WHERE user_id IN (SELECT unnest($u))", {"files": snapshots, "u": users}).fetchall()
    for path in sorted(Path(f) for (f,) in holding):  # oldest first: each reads the one before
        # Its inputs stay as they were: one already out of date stays so, for `compact` to rebuild.
        inputs = (pq.read_schema(path).metadata or {}).get(BUILT_FROM, b"").decode()
        write_in_force(history_dir, partition_day(path.parent), inputs, users)


def redact(history_dir: Path, versions: list[tuple[str, int, int]]) -> int:
    """Remove the rows of (user_id, from_version, to_version) ranges from every history file, and bring
    those people's rows in the in-force snapshots in step; returns how many history rows were removed.
    Files are rewritten whole, atomically; repeating a redaction changes nothing more, so a crash in
    between is repaired by running it again."""
    touched = sorted({u for u, _, _ in versions})
    if not touched:
        return 0
    doomed = pa.table({"user_id": [u for u, _, _ in versions], "v_from": [a for _, a, _ in versions],
                       "v_to": [b for _, _, b in versions]})
    removed = 0
    with locked(history_dir), duckdb.connect() as db:
        # Listed under the lock: a compaction may have merged (and deleted) files until it was taken.
        existing = sorted(str(f) for f in history_dir.glob("date=*/*.parquet"))
        db.register("doomed", doomed)
        files = [Path(f) for (f,) in db.execute("""
            SELECT DISTINCT h.filename FROM read_parquet($files, filename = true, hive_partitioning = false) h
            JOIN doomed d ON h.user_id = d.user_id AND h.version BETWEEN d.v_from AND d.v_to""",
                                                {"files": existing}).fetchall()] if existing else []
        for f in files:
            kept = db.sql("""
                SELECT * FROM read_parquet($file, hive_partitioning = false) h
                WHERE NOT EXISTS (SELECT 1 FROM doomed d WHERE h.user_id = d.user_id
                                  AND h.version BETWEEN d.v_from AND d.v_to)
                ORDER BY user_id, version""", params={"file": str(f)}).to_arrow_table()
            removed += pq.ParquetFile(f).metadata.num_rows - kept.num_rows
            if kept.num_rows:
                write_atomically(kept, f, row_group_size=COMPACTED_ROW_GROUP_SIZE if is_bucketed([f])
                                 else ROW_GROUP_SIZE)
            else:
                f.unlink()
        # Always: a redaction repeated after a crash finds the history done but maybe not the snapshots.
        refresh_in_force(history_dir, touched)
    return removed
