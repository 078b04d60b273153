"""Backfill a library folder through the live path: counted once, resumable."""

from __future__ import annotations

import json
import shutil

from helpers import read_topic
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.synthetic import make_library
from stylestream.pipelines.backfill import Progress
from stylestream.pipelines.store import Store
from stylestream.streams.topics import PHOTO_EVENTS


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
