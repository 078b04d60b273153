"""The Parquet style history on disk: where files go, compaction, and redaction of withdrawn versions.

Layout (hive style, one partition per UTC day of the commit):

    history/date=2026-11-29/cycle-00000042.parquet      one file per committed ingestion cycle
    history/date=2026-11-28/compacted-00000001-00000041.parquet   a closed day after `compact`

Every file has the `schemas.tables.STYLE_HISTORY` schema; rows are sorted by user and version, and
each (user_id, version) is one immutable version of a user's style. A cycle's file is written only
after the cycle committed and is rewritten whole under the same name if a crash interrupted that,
so readers see each committed version once (a reader that lists files while a compaction swaps
them may see a version twice; the queries in `analytics.drift` do not count it twice).

Writers that replace files (compaction, redaction) hold `history/.lock`, so neither can bring back
rows the other removed. Ingestion only ever adds new cycle files and needs no lock for that.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from stylestream.schemas.tables import STYLE_HISTORY

# Small row groups let a query for one user skip most of a day's file by its user_id statistics.
ROW_GROUP_SIZE = 8192


def cycle_path(history_dir: Path, cycle: int, committed_at: datetime) -> Path:
    day = committed_at.astimezone(UTC).date()
    return history_dir / f"date={day.isoformat()}" / f"cycle-{cycle:08d}.parquet"


def write_atomically(table: pa.Table, path: Path) -> None:
    """Readers see the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.cast(STYLE_HISTORY), tmp, row_group_size=ROW_GROUP_SIZE)
    os.replace(tmp, path)


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


def day_partitions(history_dir: Path) -> dict[date, list[Path]]:
    days = {}
    for part in sorted(history_dir.glob("date=*")):
        files = sorted(part.glob("*.parquet"))
        if files:
            days[date.fromisoformat(part.name.removeprefix("date="))] = files
    return days


def compact(history_dir: Path, before: date | None = None) -> list[tuple[date, int, int]]:
    """Merge each day's files into one, sorted by user and version (a version present twice, from a
    crash repeat, is kept once), for every day before `before` (default: today in UTC; ingestion
    may still be writing today's). Returns (day, files, rows) per day compacted; days that already
    are one file are left alone."""
    before = before or datetime.now(UTC).date()
    done = []
    with locked(history_dir), duckdb.connect() as db:
        for day, files in day_partitions(history_dir).items():
            if day >= before or len(files) < 2:
                continue
            table = db.sql("""SELECT DISTINCT ON (user_id, version) *
                              FROM read_parquet($files, hive_partitioning = false) ORDER BY user_id, version""",
                           params={"files": [str(f) for f in files]}).to_arrow_table()
            # cycle-<n> and compacted-<first>-<last>: "compacted" sorts first, the newest cycle last.
            first, last = int(files[0].stem.split("-")[1]), int(files[-1].stem.split("-")[-1])
            merged = files[0].parent / f"compacted-{first:08d}-{last:08d}.parquet"
            write_atomically(table, merged)
            for f in files:
                if f != merged:
                    f.unlink()
            done.append((day, len(files), table.num_rows))
    return done


def redact(history_dir: Path, versions: list[tuple[str, int, int]]) -> int:
    """Remove the rows of (user_id, from_version, to_version) ranges from every history file; returns
    how many rows were removed. Files are rewritten whole, atomically; repeating a redaction is a
    no-op, so a crash in between is repaired by running it again."""
    existing = sorted(str(f) for f in history_dir.glob("date=*/*.parquet"))
    if not versions or not existing:
        return 0
    doomed = pa.table({"user_id": [u for u, _, _ in versions], "v_from": [a for _, a, _ in versions],
                       "v_to": [b for _, _, b in versions]})
    removed = 0
    with locked(history_dir), duckdb.connect() as db:
        db.register("doomed", doomed)
        files = [Path(f) for (f,) in db.execute("""
            SELECT DISTINCT h.filename FROM read_parquet($files, filename = true, hive_partitioning = false) h
            JOIN doomed d ON h.user_id = d.user_id AND h.version BETWEEN d.v_from AND d.v_to""",
                                                {"files": existing}).fetchall()]
        for f in files:
            kept = db.sql("""
                SELECT * FROM read_parquet($file, hive_partitioning = false) h
                WHERE NOT EXISTS (SELECT 1 FROM doomed d WHERE h.user_id = d.user_id
                                  AND h.version BETWEEN d.v_from AND d.v_to)
                ORDER BY user_id, version""", params={"file": str(f)}).to_arrow_table()
            removed += pq.ParquetFile(f).metadata.num_rows - kept.num_rows
            if kept.num_rows:
                write_atomically(kept, f)
            else:
                f.unlink()
    return removed
