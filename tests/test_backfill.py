"""Backfill a library folder through the live path: counted once, resumable."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

from helpers import plant_private_metadata, produce, read_topic
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.synthetic import make_library
from stylestream.pipelines.backfill import Progress, publish, scan
from stylestream.pipelines.layout import StateLayout
from stylestream.pipelines.store import Store
from stylestream.schemas.events import parse_event
from stylestream.streams.topics import ERASURE_RECEIPTS, PHOTO_EVENTS


def test_backfill_counts_each_photo_once_and_resumes(broker, clip, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "made", {"ana": [("beach", "warm", 4), ("city", "cool", 3)]})
    library = tmp_path / "library"
    for p in photos:  # albums are the first-level folders
        (library / p.album_id).mkdir(parents=True, exist_ok=True)
        shutil.copy(p.path, library / p.album_id / p.path.name)
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "clip").symlink_to(clip.pretrained.rsplit("/", 1)[0])
    args = ["backfill", str(library), "--user", "ana", "-b", bs, "--data-dir", str(data)]
    runner = CliRunner(env={"COLUMNS": "300"})

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "7 photos" in first.output and "caught up" in first.output
    with Store(data / "state" / "state.duckdb") as s:
        [(version, _, _, count)] = s.latest_vectors().values()
        albums = dict(s.db.execute("SELECT album_id, count(*) FROM contributions GROUP BY ALL").fetchall())
    assert count == 7 and albums == {"beach": 4, "city": 3}

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "7 published by an earlier run" in again.output
    assert len(read_topic(bs, PHOTO_EVENTS)) == 7  # nothing published twice

    progress = Progress(data / "state", "ana", library)  # as if a run died after publishing 3
    progress.path.write_text(json.dumps({"published": 3, "total": 7}))
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert len(read_topic(bs, PHOTO_EVENTS)) == 7 + 4
    with Store(data / "state" / "state.duckdb") as s:
        [(v2, _, _, count2)] = s.latest_vectors().values()
    assert count2 == 7 and v2 == version  # the republished events changed nothing


def test_backfilled_events_keep_the_day_and_no_local_path(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    library = tmp_path / "home" / "someone-private" / "Pictures"
    photos = make_library(tmp_path / "made", {"ana": [("beach", "warm", 3)]})
    for p in photos:  # a camera's local capture time, no zone: 14:30 on 1 June 2025
        (library / "beach").mkdir(parents=True, exist_ok=True)
        (library / "beach" / p.path.name).write_bytes(plant_private_metadata(p.path.read_bytes()))
    ing = make_ingestor()  # its state is tmp_path/state, as --data-dir tmp_path gives
    items = scan(library)
    publish(bs, items, "ana", Progress(ing.cfg.state_dir, "ana", library), StateLayout(ing.cfg.state_dir).libraries)
    ing.run_until_caught_up()

    events = [parse_event(PHOTO_EVENTS, m.value) for m in read_topic(bs, PHOTO_EVENTS)]
    assert len(events) == 3
    for e in events:
        assert e.image.uri.startswith("library://") and e.image.uri.endswith(".jpg")
        assert e.taken_at == datetime(2025, 6, 1, tzinfo=UTC) and not e.taken_at_zone_known
    values = b"".join(m.value for m in read_topic(bs, PHOTO_EVENTS))
    assert b"someone-private" not in values and str(tmp_path).encode() not in values
    with Store(ing.cfg.db_path) as s:
        stored = s.db.execute("SELECT taken_at, upload, metadata FROM contributions JOIN photos USING (user_id, "
                              "photo_id)").fetchall()
    assert len(stored) == 3  # the photos were read through the library's registered folder
    for taken, upload, metadata in stored:
        assert (taken.hour, taken.minute, taken.second) == (0, 0, 0)
        assert json.loads(upload)["taken_at"] in ("2025-06-01T00:00:00Z", "2025-06-01T00:00:00+00:00")
        assert json.loads(metadata)["hour_of_day"] == 14  # the README's promise: the hour, no more


def test_forgetting_a_person_removes_their_library_registration_and_backfill_progress(broker, make_ingestor,
                                                                                       tmp_path):
    """The registry holds the folder's path, which often names the person: it goes with them (counted in
    the receipt), while the library another person backfilled stays."""
    bs = broker.bootstrap_servers
    ing = make_ingestor()
    state = StateLayout(ing.cfg.state_dir)
    libraries = {}
    for user, look in (("ana", "warm"), ("ben", "cool")):
        library = tmp_path / "home" / f"{user}-private" / "Pictures"
        for p in make_library(tmp_path / "made" / user, {user: [("a", look, 2)]}):
            (library / "a").mkdir(parents=True, exist_ok=True)
            shutil.copy(p.path, library / "a" / p.path.name)
        publish(bs, scan(library), user, Progress(state.root, user, library), state.libraries)
        libraries[user] = library
    ing.run_until_caught_up()
    assert len(json.loads(state.libraries.read_text())) == 2
    result = CliRunner().invoke(app, ["forget", "ana", "-b", bs])
    assert result.exit_code == 0, result.output
    ing.run_until_caught_up()

    registered = json.loads(state.libraries.read_text())
    assert list(registered.values()) == [str(libraries["ben"].resolve())]  # ana's folder is gone, ben's stays
    assert "ana-private" not in "".join(p.read_text() for p in state.backfill.rglob("*.json"))
    [receipt] = [parse_event(ERASURE_RECEIPTS, m.value) for m in read_topic(bs, ERASURE_RECEIPTS)]
    assert receipt.deleted["backfill"] == {"progress files": 1, "library registrations": 1}


def test_live_uploads_are_stored_at_day_precision(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    [photo] = make_library(tmp_path / "lib", {"ana": [("a", "warm", 1)]})
    event = photo.upload_event().model_copy(update={"taken_at": datetime(2025, 6, 1, 21, 47, 13, tzinfo=UTC)})
    produce(bs, PHOTO_EVENTS, [event])
    ing = make_ingestor()
    ing.run_until_caught_up()
    with Store(ing.cfg.db_path) as s:
        [(taken, upload)] = s.db.execute("SELECT taken_at, upload FROM contributions JOIN photos "
                                         "USING (user_id, photo_id)").fetchall()
    assert taken == datetime(2025, 6, 1, tzinfo=UTC)
    assert "21:47" not in upload and "2025-06-01T00:00:00" in upload
