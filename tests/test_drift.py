"""Drift analytics on known drift: real ingestion writes the history, DuckDB reads only the Parquet."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_BROKER
from helpers import produce
from typer.testing import CliRunner

from stylestream.analytics import drift, history
from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.cli.main import app
from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.pipelines.history_writer import step_files
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.pipelines.store import Store
from stylestream.schemas.tables import FEATURE_NAMES, STYLE_HISTORY
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, ensure_topics

LATER = datetime(2026, 3, 1, tzinfo=UTC)
WARMTH = FEATURE_NAMES.index("warmth")


@pytest.fixture(scope="module")
def ingested(clip, tmp_path_factory):
    """wendy: warm photos, then cool ones over two more cycles. sam: the same warm look and the same
    subject every cycle (what a person photographs is part of their style too).
    wanda: a warm album, then a cool album, which she then withdraws.
    One ingestion for the tests that only read it (a broker and three cycles each cost seconds)."""
    root = tmp_path_factory.mktemp("drift-ingested")
    library = make_library(root / "library", {
        "wendy": [("summer", "warm", 4), ("winter", "cool", 8)],
        "sam": [("days", "warm", 12, ("house",))],
        "wanda": [("home", "warm", 4), ("trip", "cool", 4)],
    })
    by_user = {u: [p for p in library if p.user_id == u] for u in ("wendy", "sam", "wanda")}
    with start_local_broker(TEST_BROKER, root / "kafka") as broker:
        bs = broker.bootstrap_servers
        ensure_topics(bs)
        ing = Ingestor(IngestConfig(bs, root / "state", clip))
        for part in range(3):
            produce(bs, PHOTO_EVENTS, [p.upload_event() for u in ("wendy", "sam")
                                       for p in by_user[u][4 * part:4 * part + 4]])
            if part < 2:
                produce(bs, PHOTO_EVENTS, [p.upload_event() for p in by_user["wanda"][4 * part:4 * part + 4]])
            else:
                produce(bs, CONSENT_EVENTS, [toggle_event("wanda", "album", "trip", False, LATER)])
            ing.run_until_caught_up()
        yield ing
        ing.close()


def named(ingestor, user_id: str) -> str:
    """The history holds pseudonyms; the tests hold the key."""
    return pseudonym(user_id, load_or_create_key(ingestor.cfg.state_dir))


def test_warm_to_cool_is_flagged_cooler_and_a_stable_user_is_not(ingested):
    db = drift.connect(ingested.cfg.history_dir)
    [wendy] = drift.user_drift(db, named(ingested, "wendy")).to_pylist()
    assert (wendy["from_version"], wendy["to_version"]) == (1, 3)
    assert wendy["trend"].startswith("cooler")
    assert wendy["feature_deltas"][WARMTH] < -drift.FEATURE_WORDS[0].step
    [sam] = drift.user_drift(db, named(ingested, "sam")).to_pylist()
    assert sam["trend"] == "no clear change"
    assert sam["drift"] < wendy["drift"] / 3

    top = drift.top_drift(db, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC), 2).to_pylist()
    assert top[0]["user_id"] == named(ingested, "wendy")
    timeline = drift.timeline(db, named(ingested, "wendy")).to_pylist()
    assert [r["version"] for r in timeline] == [1, 2, 3]
    assert timeline[0]["drift_from_first"] == pytest.approx(0, abs=1e-6)
    assert timeline[2]["drift_from_first"] == pytest.approx(wendy["drift"], rel=1e-5)


def test_withdrawn_photos_leave_no_version_behind(ingested):
    """wanda's version 2 counted the trip album; after the opt-out it is gone from the state and from
    every history file, so her drift is the drift without those photos: none."""
    db = drift.connect(ingested.cfg.history_dir)
    wanda_id = named(ingested, "wanda")
    assert [r["version"] for r in drift.timeline(db, wanda_id).to_pylist()] == [1, 3]
    [wanda] = drift.user_drift(db, wanda_id).to_pylist()
    assert wanda["drift"] == pytest.approx(0, abs=1e-5) and wanda["trend"] == "no clear change"
    rows = pq.read_table(ingested.cfg.history_dir).to_pylist()
    assert sorted(r["version"] for r in rows if r["user_id"] == wanda_id) == [1, 3]
    with Store(ingested.cfg.db_path) as s:
        assert [v for (v,) in s.db.execute(
            "SELECT version FROM style_versions WHERE user_id = 'wanda' ORDER BY version").fetchall()] == [1, 3]
        assert s.pending_redactions() == []


def test_cli_tables_csv_json_and_plot(ingested, tmp_path):
    runner = CliRunner()
    where = ["--history", str(ingested.cfg.history_dir)]
    key = ["--raw-id", "--key-file", str(ingested.cfg.state_dir / "analytics.key")]
    out = runner.invoke(app, ["drift", "user", "wendy", *key, "--format", "json", "--plot", str(tmp_path / "w.png"),
                              *where])
    assert out.exit_code == 0, out.output
    [row] = json.loads(out.output[:out.output.rindex("]") + 1])
    assert row["trend"].startswith("cooler") and row["delta_warmth"] < 0
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = runner.invoke(app, ["drift", "user", "wendy", *key, "--since", "1h", *where])
    assert out.exit_code == 0 and "cooler" in out.output and "from version 1" in out.output, out.output
    out = runner.invoke(app, ["drift", "user", "wendy", *key, "--since", "2h", "--until", "1h", *where])
    assert out.exit_code == 1 and "did not change" in out.output

    out = runner.invoke(app, ["drift", "top", "--since", "1h", "-n", "3", "--format", "csv", *where])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert rows[0]["user_id"] == named(ingested, "wendy") and "delta_saturation" in rows[0]

    out = runner.invoke(app, ["drift", "population", "--since", "1h", *where])
    assert out.exit_code == 0 and "Population drift" in out.output
    out = runner.invoke(app, ["drift", "timeline", "nobody", *where])
    assert out.exit_code == 1 and "no versions" in out.output
    out = runner.invoke(app, ["drift", "timeline", named(ingested, "sam"), "--format", "csv", *where])
    assert out.exit_code == 0 and len(list(csv.DictReader(io.StringIO(out.output)))) == 3
    out = runner.invoke(app, ["drift", "timeline", "sam", "--raw-id", "--key-file", str(tmp_path / "none"), *where])
    assert out.exit_code == 1 and "no analytics key at" in out.output
    # The id the operator knows, with the key beside the history found on its own; titles say that id.
    out = runner.invoke(app, ["drift", "timeline", "sam", *where], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "Style versions of sam" in out.output, out.output
    out = runner.invoke(app, ["drift", "user", "wendy", *where], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "wendy: cooler" in out.output, out.output
    out = runner.invoke(app, ["drift", "top", "--since", "yesterday-ish", *where])
    assert out.exit_code == 2 and "not a time" in out.output


def write_days(folder, days: int, users: list[str], start: datetime) -> None:
    """A synthetic history: each user one version a day; u0's warmth falls 0.02 a day."""
    rng = np.random.default_rng(0)
    for d in range(days):
        rows = []
        for u in users:
            features = np.zeros(len(FEATURE_NAMES), np.float32)
            features[WARMTH] = 0.1 - (0.02 * d if u == "u0" else 0)
            embedding = rng.normal(size=8) if u == "u1" else np.ones(8)
            rows.append({"user_id": u, "version": d + 1, "cycle": d + 1, "updated_at": start + timedelta(days=d),
                         "photo_count": d + 1, "total_weight": 1.0, "embedding": embedding.tolist(),
                         "features": features.tolist(), "facets": [], "tombstone": False})
        table = pa.Table.from_pylist(rows, STYLE_HISTORY)
        history.write_atomically(table, history.cycle_path(folder, d + 1, start + timedelta(days=d)))


def test_compaction_keeps_every_version_once_and_queries_unchanged(tmp_path):
    start = datetime(2026, 8, 1, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 6, ["u0", "u1", "u2"], start)
    # Three more cycles on the first day, one repeating a file (as a crash before marking it would).
    first_day = next(folder.glob("date=2026-08-01/*.parquet"))
    (folder / "date=2026-08-01" / "cycle-00000007.parquet").write_bytes(first_day.read_bytes())
    db = drift.connect(folder)
    query = "SELECT * FROM top_drift(TIMESTAMPTZ '2026-08-02', TIMESTAMPTZ '2026-08-07', 3)"
    before = db.sql(query).to_arrow_table().to_pylist()
    assert [r["version"] for r in drift.timeline(db, "u0").to_pylist()] == [1, 2, 3, 4, 5, 6]

    done = history.compact(folder, before=datetime(2026, 8, 3).date())
    # The first day's two files merged; the second day's one split by bucket too.
    assert [(d.isoformat(), files, rows) for d, files, rows in done.merged] == [
        ("2026-08-01", 2, 3), ("2026-08-02", 1, 3)]
    assert sorted(p.name for p in (folder / "date=2026-08-01").glob("*.parquet")) == sorted(
        {f"compacted-00000001-00000007-users-{bucket(u)}.parquet" for u in ["u0", "u1", "u2"]})
    assert [d.isoformat() for d in done.snapshots] == ["2026-08-01", "2026-08-02"]  # the closed days
    db = drift.connect(folder)  # now with the snapshots: the window's start reads the one of 08-01
    assert db.sql(query).to_arrow_table().to_pylist() == before
    again = history.compact(folder, before=datetime(2026, 8, 3).date())
    assert again.merged == [] and again.snapshots == []  # nothing left to merge, every snapshot current


def bucket(user: str) -> str:
    """`drift.user_bucket`, written again from its definition: the first hex digit of the md5."""
    return hashlib.md5(user.encode()).hexdigest()[0]


def files_read(db, sql: str) -> int:
    db.execute("PRAGMA enable_profiling = 'query_tree'")
    plan = db.execute(f"EXPLAIN ANALYZE {sql}").fetchall()[0][1]
    db.execute("PRAGMA disable_profiling")
    return sum(int(n) for n in re.findall(r"Total Files Read: (\d+)", plan))


def test_a_closed_day_is_one_file_per_user_bucket_and_a_timeline_reads_only_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "COMPACTED_ROW_GROUP_SIZE", 2)  # groups of 2 rows, to see them used
    start = datetime(2026, 8, 1, tzinfo=UTC)
    folder = tmp_path / "history"
    users = [f"u{i}" for i in range(40)]
    write_days(folder, 5, users, start)
    db = drift.connect(folder)
    timeline = drift.timeline(db, "u0").to_pylist()
    assert files_read(db, "SELECT * FROM versions_of('u0')") == 5  # one file a day, each with everyone

    history.compact(folder, before=datetime(2026, 8, 4).date())
    for day in ["2026-08-01", "2026-08-02", "2026-08-03"]:
        files = sorted((folder / f"date={day}").glob("*.parquet"))
        assert len(files) == len({bucket(u) for u in users}) > 1
        for f in files:  # each file holds its bucket's people, sorted, in the compacted files' row groups
            ids = pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist()
            assert {bucket(u) for u in ids} == {f.stem.rsplit("-", 1)[1]} and ids == sorted(ids)
            assert pq.ParquetFile(f).metadata.num_row_groups == (len(ids) + 1) // 2
        assert max(len(pq.read_table(f, columns=["user_id"])) for f in files) > 2
    db = drift.connect(folder)
    assert drift.timeline(db, "u0").to_pylist() == timeline
    # Its own bucket's file of each closed day, and the two open days' files.
    assert files_read(db, "SELECT * FROM versions_of('u0')") == 3 + 2
    assert db.execute("SELECT user_bucket('u0')").fetchall() == [(bucket("u0"),)]


def test_a_compaction_cut_short_is_done_again_and_keeps_every_version_once(tmp_path):
    start = datetime(2026, 8, 1, tzinfo=UTC)
    folder = tmp_path / "history"
    users = [f"u{i}" for i in range(40)]
    write_days(folder, 2, users, start)
    before = pq.read_table(folder).sort_by([("user_id", "ascending"), ("version", "ascending")])
    day = folder / "date=2026-08-01"
    original = {f.name: f.read_bytes() for f in day.glob("*.parquet")}
    history.compact(folder, before=datetime(2026, 8, 2).date())
    # As if it stopped half way through writing: the old file back, half the bucket files missing.
    buckets = sorted(day.glob("*.parquet"))
    for f in buckets[::2]:
        f.unlink()
    for name, data in original.items():
        (day / name).write_bytes(data)
    assert not history.is_bucketed(sorted(day.glob("*.parquet")))

    again = history.compact(folder, before=datetime(2026, 8, 2).date())
    assert [(d.isoformat(), rows) for d, _, rows in again.merged] == [("2026-08-01", len(users))]
    assert sorted(f.name for f in day.glob("*.parquet")) == sorted(f.name for f in buckets)
    after = pq.read_table(folder).sort_by([("user_id", "ascending"), ("version", "ascending")])
    assert after.drop_columns(["date"]).equals(before.drop_columns(["date"]))


def test_history_file_names():
    assert history.cycles_of(Path("date=2026-08-01/cycle-00000042.parquet")) == (42, 42)
    assert history.cycles_of(Path("stream-00000007.parquet")) == (7, 7)
    assert history.cycles_of(Path("compacted-00000001-00000041.parquet")) == (1, 41)  # before buckets
    assert history.cycles_of(Path("compacted-00000001-00000041-users-a.parquet")) == (1, 41)
    with pytest.raises(ValueError, match="not a history file name"):
        history.cycles_of(Path("notes.parquet"))
    one = [Path(f"compacted-00000001-00000041-users-{b}.parquet") for b in "0af"]
    assert history.is_bucketed(one)
    assert not history.is_bucketed([*one, Path("cycle-00000042.parquet")])  # a late cycle: merge again
    assert not history.is_bucketed([Path("compacted-00000001-00000041.parquet")])  # split it
    assert not history.is_bucketed([one[0], Path("compacted-00000001-00000042-users-b.parquet")])


def in_force_by_scan(db, t: datetime) -> list[tuple]:
    """What `in_force_at` must give, from every history row: the definition without snapshots."""
    return db.execute("""SELECT user_id, max(version), arg_max(date, version), min(version), arg_min(date, version)
                         FROM history WHERE updated_at <= $t GROUP BY user_id ORDER BY user_id""", {"t": t}).fetchall()


def in_force(db, t: datetime) -> list[tuple]:
    return db.execute("SELECT user_id, version, version_date, first_version, first_date FROM in_force_at($t) "
                      "ORDER BY user_id", {"t": t}).fetchall()


def test_in_force_snapshots_answer_as_a_full_scan_and_follow_redactions_and_late_files(tmp_path, monkeypatch):
    start = datetime(2026, 8, 1, 12, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 6, ["u0", "u1", "u2"], start)
    write_days(folder / "late-comer", 3, ["u3"], start + timedelta(days=2))  # u3 appears on day 3
    for f in (folder / "late-comer").rglob("*.parquet"):
        target = folder / f.parent.name / f"cycle-0000009{f.stem[-1]}.parquet"
        f.rename(target)
    shutil.rmtree(folder / "late-comer")
    times = [start + timedelta(days=d, hours=h) for d in range(-1, 7) for h in (-12, 0, 6)]

    # 1. Compaction writes a snapshot per closed day; every answer equals the full scan's.
    done = history.compact(folder, before=datetime(2026, 8, 6).date())
    assert len(done.snapshots) == 5
    db = drift.connect(folder)
    assert all(in_force(db, t) == in_force_by_scan(db, t) for t in times)
    plan = db.sql("EXPLAIN ANALYZE SELECT * FROM in_force_at(TIMESTAMPTZ '2026-08-05 13:00')").fetchall()[0][1]
    # One snapshot file (08-04's, of five) and one day's history (08-05's bucket files, of six days).
    assert re.findall(r"Total Files Read: (\d+)", plan) == ["1", str(len({bucket(u) for u in "u0 u1 u2 u3".split()}))]

    # 2. A withdrawal and a forgetting leave the snapshots too, and no byte of the forgotten remains.
    history.redact(folder, [("u0", 2, 3), ("u1", 0, 99)])
    db = drift.connect(folder)
    assert all(in_force(db, t) == in_force_by_scan(db, t) for t in times)
    assert in_force(db, start + timedelta(days=2, hours=1))[0][:2] == ("u0", 1)  # v2 and v3 withdrawn
    snapshots = list((folder / drift.IN_FORCE_DIR).rglob("*.parquet"))
    assert snapshots and not any(b"u1" in f.read_bytes() for f in snapshots)

    # 3. A file that lands in a closed day after its snapshot: the next compaction rebuilds from that day.
    write_days(folder / "again", 1, ["u4"], start + timedelta(days=3))
    late = next((folder / "again").rglob("*.parquet"))
    late.rename(folder / late.parent.name / "cycle-00000099.parquet")
    shutil.rmtree(folder / "again")
    done = history.compact(folder, before=datetime(2026, 8, 6).date())
    assert [d.isoformat() for d in done.snapshots] == ["2026-08-04", "2026-08-05"]
    db = drift.connect(folder)
    assert all(in_force(db, t) == in_force_by_scan(db, t) for t in times)

    # 4. A compaction that stopped after rebuilding the first of them (a late file in 08-02): the next
    #    one rebuilds those after it, whose inputs include the one rebuilt.
    write_days(folder / "again", 1, ["u5"], start + timedelta(days=1))
    late = next((folder / "again").rglob("*.parquet"))
    late.rename(folder / late.parent.name / "cycle-00000098.parquet")
    shutil.rmtree(folder / "again")
    real_write, writes = history.write_in_force, []

    def write_once(*args, **kwargs):
        if writes:
            raise KeyboardInterrupt
        writes.append(args[1])
        real_write(*args, **kwargs)

    monkeypatch.setattr(history, "write_in_force", write_once)
    with pytest.raises(KeyboardInterrupt):
        history.compact(folder, before=datetime(2026, 8, 6).date())
    monkeypatch.setattr(history, "write_in_force", real_write)
    done = history.compact(folder, before=datetime(2026, 8, 6).date())
    assert [d.isoformat() for d in writes + done.snapshots] == [
        "2026-08-02", "2026-08-03", "2026-08-04", "2026-08-05"]
    db = drift.connect(folder)
    assert all(in_force(db, t) == in_force_by_scan(db, t) for t in times)

    # 5. Everyone forgotten: the snapshots go with the history.
    history.redact(folder, [(u, 0, 99) for u in ("u0", "u2", "u3", "u4", "u5")])
    assert not (folder / drift.IN_FORCE_DIR).exists()


def test_a_snapshot_comes_once_the_history_since_the_last_holds_as_many_rows_as_it_has_people(tmp_path):
    start = datetime(2026, 8, 1, 12, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 1, ["u0", "u1", "u2", "u3"], start)  # four people on the first day...
    write_days(tmp_path / "u0", 9, ["u0"], start)  # ...then only u0, a version a day
    for f in sorted((tmp_path / "u0").rglob("*.parquet"))[1:]:
        (folder / f.parent.name).mkdir(exist_ok=True)
        f.rename(folder / f.parent.name / f.name)
    done = history.compact(folder, before=datetime(2026, 8, 10).date())
    assert [d.isoformat() for d in done.snapshots] == ["2026-08-01", "2026-08-05", "2026-08-09"]
    db = drift.connect(folder)
    times = [start + timedelta(days=d, hours=h) for d in range(10) for h in (-12, 0)]
    assert all(in_force(db, t) == in_force_by_scan(db, t) for t in times)


def test_a_connection_made_before_the_first_snapshot_answers_from_the_rows(tmp_path):
    start = datetime(2026, 8, 1, 12, tzinfo=UTC)
    write_days(tmp_path / "history", 4, ["u0", "u1"], start)
    db = drift.connect(tmp_path / "history")
    history.compact(tmp_path / "history", before=datetime(2026, 8, 4).date())  # snapshots appear meanwhile
    t = start + timedelta(days=3)
    assert in_force(db, t) == in_force_by_scan(db, t) == [
        ("u0", 4, t.date(), 1, start.date()), ("u1", 4, t.date(), 1, start.date())]


def test_a_streaming_step_past_midnight_files_each_row_where_the_snapshots_find_it(tmp_path):
    # The history writer planned a step just before midnight; the runner, its clock a little ahead,
    # committed u1's version just after. Filed under the step's day, the snapshot of that day (closed
    # before the commit) and every later answer would miss it.
    start = datetime(2026, 8, 1, 12, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 3, ["u0", "u1"], start)
    planned_at = datetime(2026, 8, 3, 23, 59, 59, tzinfo=UTC)
    rows = [{"user_id": u, "version": 9, "cycle": 0, "updated_at": planned_at + timedelta(seconds=s),
             "photo_count": 1, "total_weight": 1.0, "embedding": [1.0] * 8, "features": [0.0] * len(FEATURE_NAMES),
             "facets": [], "tombstone": False} for u, s in (("u0", -30), ("u1", 6))]
    files = step_files(folder, 7, planned_at, rows)
    assert {p.parent.name: [r["user_id"] for r in rs] for p, rs in files.items()} == {
        "date=2026-08-03": ["u0"], "date=2026-08-04": ["u1"]}
    for path, file_rows in files.items():
        history.write_atomically(pa.Table.from_pylist(file_rows, STYLE_HISTORY), path)
    history.compact(folder, before=datetime(2026, 8, 5).date())
    db = drift.connect(folder)
    times = [planned_at + timedelta(hours=h) for h in (-1, 0.001, 0.01, 12, 30)]
    assert all(in_force(db, t) == in_force_by_scan(db, t) for t in times)
    assert [v for _, v, *_ in in_force(db, times[3])] == [9, 9]


def test_top_population_and_words_on_a_known_history(tmp_path):
    start = datetime(2026, 8, 1, tzinfo=UTC)
    write_days(tmp_path / "history", 10, ["u0", "u1", "u2", "u3"], start)
    for day in ("2026-08-04", "2026-08-10"):  # both ends of the window's pairs read twice (a crash repeat)
        [f] = (tmp_path / "history" / f"date={day}").glob("*.parquet")
        (f.parent / "cycle-00000099.parquet").write_bytes(f.read_bytes())
    db = drift.connect(tmp_path / "history")
    t0, t1 = start + timedelta(days=3), start + timedelta(days=9)
    top = drift.top_drift(db, t0, t1, 4).to_pylist()
    assert top[0]["user_id"] == "u1" and top[0]["drift"] > 0.1  # random embeddings: far apart
    assert {r["user_id"]: r["trend"] for r in top}["u0"] == "cooler"
    assert all((r["from_version"], r["to_version"]) == (4, 10) for r in top)
    window = {"t0": t0, "t1": t1}
    everyone = db.sql("SELECT * FROM drift_between($t0, $t1) ORDER BY drift DESC, user_id", params=window)
    assert [r["user_id"] for r in everyone.to_arrow_table().to_pylist()] == ["u1", "u0", "u2", "u3"]  # once each
    for n in (1, 2, 4):  # top_drift's two passes give what one pass over everyone gives
        assert db.sql(f"SELECT * FROM top_drift($t0, $t1, {n})", params=window).to_arrow_table().to_pylist() == \
            everyone.to_arrow_table().to_pylist()[:n]
    [pop] = drift.population_drift(db, t0, t1, threshold=0.05).to_pylist()
    assert pop["users"] == 4 and pop["share_moved"] == 0.25
    assert pop["feature_deltas"][WARMTH] == pytest.approx(-0.12 / 4, abs=1e-6)

    words = db.sql("SELECT trend_words($d)", params={"d": [
        0.05 if n == "brightness" else -0.1 if n == "warmth" else -0.09 if n == "saturation" else 0.0
        for n in FEATURE_NAMES]}).fetchall()[0][0]
    assert words == "cooler, less saturated and brighter"  # ordered by change / step


def test_redaction_rewrites_only_the_files_holding_those_versions(tmp_path):
    start = datetime(2026, 8, 1, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 4, ["u0", "u1"], start)
    untouched = {p: p.stat().st_mtime_ns for p in folder.glob("date=2026-08-0[14]/*.parquet")}
    assert history.redact(folder, [("u0", 2, 3)]) == 2
    assert history.redact(folder, [("u0", 2, 3)]) == 0  # repeating it is a no-op
    rows = pq.read_table(folder).to_pylist()
    assert sorted((r["user_id"], r["version"]) for r in rows) == [
        ("u0", 1), ("u0", 4), ("u1", 1), ("u1", 2), ("u1", 3), ("u1", 4)]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert history.redact(folder, [("u0", 1, 4), ("u1", 1, 4)]) == 6  # every row: the files go
    assert not list(folder.glob("date=*/*.parquet"))
    assert history.redact(folder, [("u0", 1, 4)]) == 0  # and an empty history is no error


def test_a_redaction_waiting_for_a_compaction_redacts_the_files_it_left(tmp_path, monkeypatch):
    start = datetime(2026, 8, 1, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 2, ["u0", "u1"], start)
    write_days(tmp_path / "more", 1, ["u2"], start)  # a second file in the first day, for compaction to merge
    f = next((tmp_path / "more").rglob("*.parquet"))
    f.rename(folder / f.parent.name / "cycle-00000005.parquet")
    real_locked, compactions = history.locked, []

    @contextlib.contextmanager
    def compaction_first(history_dir):  # a compaction holds the lock when the redaction asks for it
        if not compactions:
            compactions.append("running")  # its own call of locked() goes straight through
            compactions[0] = history.compact(history_dir, before=datetime(2026, 8, 2).date())
        with real_locked(history_dir):
            yield

    monkeypatch.setattr(history, "locked", compaction_first)
    assert history.redact(folder, [("u0", 1, 1)]) == 1
    assert compactions[0].merged == [(datetime(2026, 8, 1).date(), 2, 3)]
    rows = pq.read_table(folder).to_pylist()
    assert sorted((r["user_id"], r["version"]) for r in rows) == [("u0", 2), ("u1", 1), ("u1", 2), ("u2", 1)]


def test_parse_when():
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    assert drift.parse_when("90d", now) == now - timedelta(days=90)
    assert drift.parse_when("12h", now) == now - timedelta(hours=12)
    assert drift.parse_when("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a time"):
        drift.parse_when("last tuesday", now)


def test_cli_sql_compact_and_a_missing_history(tmp_path):
    start = datetime(2026, 8, 1, tzinfo=UTC)
    folder = tmp_path / "history"
    write_days(folder, 3, ["u0", "u1"], start)
    first_day = next(folder.glob("date=2026-08-01/*.parquet"))
    (folder / "date=2026-08-01" / "cycle-00000009.parquet").write_bytes(first_day.read_bytes())
    runner = CliRunner()
    out = runner.invoke(app, ["drift", "sql", "SELECT user_id, count(*) AS n FROM history GROUP BY ALL ORDER BY 1",
                              "--format", "json", "--history", str(folder)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [{"user_id": "u0", "n": 4}, {"user_id": "u1", "n": 4}]  # day 1 twice
    out = runner.invoke(app, ["history", "compact", "--before", "2026-08-02", "--history", str(folder)])
    assert out.exit_code == 0 and "2026-08-01: 2 files -> one per user bucket (2 versions)" in out.output, out.output
    out = runner.invoke(app, ["drift", "sql", "SELECT count(*) AS n FROM history", "--format", "json",
                              "--history", str(folder)])
    assert json.loads(out.output) == [{"n": 6}]
    out = runner.invoke(app, ["drift", "sql", "SELECT nonsense FROM history", "--history", str(folder)])
    assert out.exit_code == 1 and "nonsense" in out.output
    out = runner.invoke(app, ["drift", "top", "--history", str(tmp_path / "elsewhere")])
    assert out.exit_code == 1 and "no style history" in out.output
