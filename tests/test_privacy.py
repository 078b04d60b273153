"""Private metadata planted in photos never reaches anything the pipeline writes."""

from __future__ import annotations

import json

from helpers import PLANTED, plant_private_metadata, produce, read_topic

from stylestream.demo.synthetic import PRIVATE_EXIF, make_library
from stylestream.pipelines.store import Store
from stylestream.streams.topics import ALL_TOPICS, PHOTO_EVENTS


def test_planted_exif_values_appear_in_no_store(broker, make_ingestor, tmp_path, caplog):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 3)]})
    for p in photos:
        p.path.write_bytes(plant_private_metadata(p.path.read_bytes()))
    planted = [PRIVATE_EXIF["serial"], PRIVATE_EXIF["artist"], PRIVATE_EXIF["owner"], "12.345", "SynthCam",
               *PLANTED.values()]
    raw = photos[0].path.read_bytes()
    for value in planted:
        assert value.encode() in raw or value == "12.345", value  # really planted (GPS is stored as a rational)
    bad = photos[1].upload_event()
    bad = bad.model_copy(update={"image": bad.image.model_copy(update={"size_bytes": 1})})  # to the DLQ
    produce(bs, PHOTO_EVENTS, [photos[0].upload_event(), photos[2].upload_event(), bad])
    ing = make_ingestor()
    ing.run_until_caught_up()

    with Store(ing.cfg.db_path) as s:
        rows = s.db.execute("SELECT metadata FROM contributions").fetchall()
    assert len(rows) == 2
    for (meta,) in rows:
        assert set(json.loads(meta)) == {"focal_length_mm", "f_number", "exposure_time_s", "iso", "flash",
                                         "hour_of_day"}
    stores = [p.read_bytes() for p in ing.cfg.state_dir.rglob("*") if p.is_file()]
    stores += [m.value or b"" for t in ALL_TOPICS for m in read_topic(bs, t) if t != PHOTO_EVENTS]
    stores.append(caplog.text.encode())
    for blob in stores:
        for value in planted:
            assert value.encode() not in blob
