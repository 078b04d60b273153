"""The style history, and a forgotten person's erasure beside the state, from committed style vectors:
for the streaming runners (Prism, the Flink job), whose per-user state lives in the runner.

    stylestream history follow -b KAFKA --data-dir DIR      # beside the runner, until Ctrl-C

It reads `style-vectors` as committed (read_committed: what the Flink job's aborted transactions
wrote is never read) in steps. Each step's offset ranges are recorded before it runs, so a step
repeated after a crash reads the same messages and rewrites the same files
(`history/date=<day>/stream-NNNNNNNN.parquet`, see `step_files`); its offsets move in the transaction that marks it
done. So the history shows every committed version exactly once. In a step:
  1. each version becomes a history row under the person's pseudonym; a version that withdraws earlier
     ones removes their rows, from the step's rows and from the files already written;
  2. a tombstone (a forgotten person) drops the step's rows of theirs up to it, and opens their
     erasure with the notice it carries (pipelines/forgetting.py), committed with the step;
  3. after the commit, each open erasure's steps beside the state (history rows, release ledger,
     backfill progress, library registrations), counted into its receipts, then the receipts are
     signed and published on erasure-receipts, once each.
It keeps its offsets and the erasures in progress in `state/history-writer.duckdb`, and must not fall
further behind than style-vectors' `min.compaction.lag.ms` (1 h): compaction may then remove a
superseded version, or a tombstone's notice, before it is read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from stylestream.analytics import history
from stylestream.analytics.pseudonyms import pseudonym
from stylestream.pipelines import forgetting
from stylestream.pipelines.settings import IngestSettings
from stylestream.privacy.erasure import load_signing_key_file
from stylestream.schemas.events import InvalidEvent, StyleVectorUpdated, parse_event
from stylestream.schemas.tables import FEATURE_NAMES, STYLE_HISTORY
from stylestream.streams import clients
from stylestream.streams.topics import STYLE_VECTORS, ensure_topics
from stylestream.transforms.kafka_read import OffsetRange, plan_ranges

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (partition INTEGER PRIMARY KEY, next_offset BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (step BIGINT PRIMARY KEY, planned_at TIMESTAMPTZ NOT NULL, ranges JSON NOT NULL,
                                  done BOOLEAN NOT NULL DEFAULT false);
"""
MAX_PER_PARTITION = 5000  # messages per partition per step: bounds a step's memory
STREAM_CYCLE = 0  # the history's `cycle` of versions a streaming runner published (it has no cycles)


def history_row(v: StyleVectorUpdated, key: bytes) -> dict:
    """A published version as a history row (schemas/tables.STYLE_HISTORY), under the pseudonym."""
    total = v.total_weight or 0.0
    return {"user_id": pseudonym(v.user_id, key), "version": v.version, "cycle": STREAM_CYCLE,
            "updated_at": v.event_time, "photo_count": v.photo_count, "total_weight": total,
            "embedding": v.embedding, "features": [v.features[n] for n in FEATURE_NAMES],
            "facets": [{"photo_count": f.photo_count, "total_weight": f.weight_share * total, "embedding": f.embedding,
                        "features": [f.features[n] for n in FEATURE_NAMES]} for f in v.facets],
            "tombstone": False}


@dataclass
class StepOutcome:
    """What one step's messages do (step 1 and 2 of the module's list): pure, from the messages alone."""

    rows: dict[tuple[str, int], dict] = field(default_factory=dict)  # (pseudonym, version) -> row
    withdrawn: list[tuple[str, int, int]] = field(default_factory=list)  # (pseudonym, first, last) in the files
    erasures: list[StyleVectorUpdated] = field(default_factory=list)  # tombstones with their notices


def fold_step(messages: list[clients.Message], key: bytes) -> StepOutcome:
    """The step's versions, withdrawals and erasures, one partition after another in offset order
    (a person's messages are all on one partition)."""
    out = StepOutcome()
    for m in messages:
        if m.value is None:  # the null-value tombstone after a tombstone event
            continue
        try:
            v = parse_event(STYLE_VECTORS, m.value)
        except InvalidEvent:
            continue  # not ingestion's: a broken producer; nothing of it belongs in the history
        user = pseudonym(v.user_id, key)
        if v.tombstone:  # what they send later is numbered after it
            out.rows = {k: r for k, r in out.rows.items() if not (k[0] == user and k[1] <= v.version)}
            if v.erasure is not None:
                out.erasures.append(v)
            continue
        if v.withdrawn_versions:
            first, last = min(v.withdrawn_versions), max(v.withdrawn_versions)
            out.rows = {k: r for k, r in out.rows.items() if not (k[0] == user and first <= k[1] <= last)}
            out.withdrawn.append((user, first, last))
        out.rows[(user, v.version)] = history_row(v, key)
    return out


def step_files(history_dir: Path, step: int, planned_at: datetime, rows: list[dict]) -> dict[Path, list[dict]]:
    """The step's files and their rows. A row goes under the step's day, or under its own commit day
    (`updated_at`, the runner's clock) where that is later: a closed day's in-force snapshot takes the
    rows committed by its end from that day's partition and those before it, so a row filed in a day
    before its commit (a runner's clock ahead of this writer's across midnight) would be missed for
    good. The other way round, a version read after its day ended (the writer behind) is filed under
    the step's day and counts from that day's start, in every answer: filed under its own, closed day
    it would be missing from the answers until the next compaction rebuilt that day's snapshot."""
    step_day = planned_at.astimezone(UTC).date()
    files: dict[Path, list[dict]] = {}
    for row in rows:
        day = max(step_day, row["updated_at"].astimezone(UTC).date())
        files.setdefault(history_dir / f"date={day.isoformat()}" / f"stream-{step:08d}.parquet", []).append(row)
    return files


class HistoryWriter:
    """Writes the history of one streaming deployment (one state folder) from its broker."""

    def __init__(self, bootstrap_servers: str, settings: IngestSettings):
        self._settings, self._state = settings, settings.state
        self._key = settings.analytics_key()
        ensure_topics(bootstrap_servers, settings.partitions)
        self._consumer = clients.consumer(bootstrap_servers)
        self._producer = clients.producer(bootstrap_servers)
        self._state.root.mkdir(parents=True, exist_ok=True)
        self._open()

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        self.db.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_step(self) -> int:
        """One step (the unfinished one first, after a crash); returns how many messages it read."""
        step, planned_at, ranges = self._unfinished() or self._plan()
        if not ranges:
            self._finish_erasures()
            return 0
        messages = [m for r in ranges for m in clients.read_range(
            self._consumer, clients.TopicPartition(r.topic, r.partition), r.start, r.stop)]
        outcome = fold_step(messages, self._key)
        # 1. Withdrawn versions leave the files written before (this step's own files are rewritten whole).
        rows = sorted(outcome.rows.values(), key=lambda r: (r["user_id"], r["version"]))
        files = step_files(self._state.history, step, planned_at, rows)
        for path in self._state.history.glob(f"date=*/stream-{step:08d}.parquet"):
            path.unlink()  # wherever an earlier try of this step wrote
        history.redact(self._state.history, outcome.withdrawn)
        for path, file_rows in files.items():
            history.write_atomically(pa.Table.from_pylist(file_rows, STYLE_HISTORY), path)
        # 2. The erasures open, the offsets move and the step is done, in one transaction.
        self.db.execute("BEGIN TRANSACTION")
        for v in outcome.erasures:
            self.receipts.open(step, v.erasure, v.user_id, v.version)
        self.db.executemany("INSERT OR REPLACE INTO offsets VALUES (?, ?)", [[r.partition, r.stop] for r in ranges])
        self.db.execute("UPDATE steps SET done = true WHERE step = ?", [step])
        self.db.execute("COMMIT")
        # 3. What lies beside the state, then the receipts.
        self._finish_erasures()
        return len(messages)

    def run(self, stop: threading.Event, follow: bool, on_step: Callable[[int], None] | None = None,
            poll_interval_s: float = 0.5) -> None:
        """Steps until caught up (or, with `follow`, until `stop` is set)."""
        while not stop.is_set():
            n = self.run_step()
            if n and on_step:
                on_step(n)
            if not n:
                if not follow:
                    return
                stop.wait(poll_interval_s)

    def _unfinished(self) -> tuple[int, datetime, list[OffsetRange]] | None:
        row = self.db.execute("SELECT step, planned_at, ranges FROM steps WHERE NOT done").fetchone()
        return (row[0], row[1], [OffsetRange(**r) for r in json.loads(row[2])]) if row else None

    def _plan(self) -> tuple[int, datetime, list[OffsetRange]]:
        done = {(STYLE_VECTORS, p): o for p, o in self.db.execute("SELECT partition, next_offset FROM offsets")
                .fetchall()}
        ends = clients.true_end_offsets(self._consumer, clients.partitions_of(self._consumer, STYLE_VECTORS))
        ranges = plan_ranges(done, {(tp.topic, tp.partition): end for tp, end in ends.items()}, MAX_PER_PARTITION)
        [(step,)] = self.db.execute("SELECT coalesce(max(step), 0) + 1 FROM steps").fetchall()
        planned_at = datetime.now(UTC)
        if ranges:
            self.db.execute("INSERT INTO steps (step, planned_at, ranges) VALUES (?, ?, ?)",
                            [step, planned_at, json.dumps([r.__dict__ for r in ranges])])
        return step, planned_at, ranges

    def _finish_erasures(self) -> None:
        if self.receipts.pending():
            forgetting.erase_pending(self.receipts, self._state, self._key)
            # The erased ids' rows leave the file, not only the table.
            forgetting.rewrite_database(self.db, self._state.history_writer)
            self._open()
        forgetting.sign_and_publish(self.receipts, lambda: load_signing_key_file(self._settings.signing_key_path),
                                    self._publish)

    def _publish(self, messages: list[tuple[str, bytes, bytes]]) -> None:
        with clients.sending(self._producer, transactional=False) as send:
            for message in messages:
                send(*message)

    def _open(self) -> None:
        self.db = duckdb.connect(str(self._state.history_writer))
        self.db.execute(SCHEMA)
        self.receipts = forgetting.ReceiptBook(self.db)
