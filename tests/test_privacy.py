"""Privacy a person can check: manifests they verify from their own photos, forgetting them with a
signed receipt, an audit that finds nothing of them afterwards, and planted metadata kept out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import numpy as np
import pytest
from helpers import PLANTED, latest_styles, plant_private_metadata, produce, read_topic
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.synthetic import PRIVATE_EXIF, make_library, toggle_event
from stylestream.pipelines import forgetting
from stylestream.pipelines.layout import StateLayout
from stylestream.pipelines.store import Store
from stylestream.privacy.audit import audit, needles_for
from stylestream.privacy.erasure import load_or_create_signing_key, verify_receipt
from stylestream.privacy.verify import files_by_sha256, photos_in_set, verify
from stylestream.schemas.events import (
    ErasureReceipt,
    GenerationFailed,
    GenerationRequested,
    StyleManifest,
    UserForgotten,
    parse_event,
)
from stylestream.serving.generator import StyleGenerator
from stylestream.serving.worker import OutputStore, ServeConfig, Worker
from stylestream.streams.topics import (
    CONSENT_EVENTS,
    ERASURE_RECEIPTS,
    GENERATION_REQUESTS,
    GENERATION_RESULTS,
    PHOTO_EVENTS,
    STYLE_MANIFESTS,
    STYLE_VECTORS,
)

PERSON = "pia-7f3a9c"  # distinctive: the audit looks for it as a substring everywhere


def latest_manifest(bs: str, user: str) -> StyleManifest | None:
    value = None
    for m in read_topic(bs, STYLE_MANIFESTS):
        if m.key == user.encode():
            value = m.value
    return None if value is None else StyleManifest.model_validate_json(value)


def generate(bs: str, worker: Worker, user: str, rid: str) -> None:
    produce(bs, GENERATION_REQUESTS, [GenerationRequested(
        event_id=f"e-{rid}", user_id=user, event_time=datetime.now(UTC), request_id=rid, prompt="a card")])
    assert worker.run(max_requests=1, idle_exit_s=30) == 1


@pytest.mark.slow
def test_a_person_verifies_their_style_withdraws_a_photo_and_is_forgotten(broker, make_ingestor, clip, diffusion,
                                                                        tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "pia-photos", {PERSON: [("trips", "warm", 3), ("home", "mono", 2)],
                                                    "olaf": [("a", "cool", 3)]})
    mine = [p for p in photos if p.user_id == PERSON]
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    ing = make_ingestor()
    ing.run_until_caught_up()

    # 1. The manifest names every photo that counts; the style code rides on the vector; the person
    #    recomputes the vector from their own files
    first = latest_manifest(bs, PERSON)
    assert [p.photo_id for p in first.photos] == sorted(p.photo_id for p in mine)
    assert latest_styles(bs)[PERSON].style_code == first.style_code
    files = files_by_sha256(tmp_path / "pia-photos")
    check = verify(first, files, clip)
    assert check.code_matches and check.vector_matches, check
    assert check.embedding_diff < 1e-4

    # 2. A withdrawal: the next manifest lacks the photo, and the person's files agree with it
    gone = mine[0]
    produce(bs, CONSENT_EVENTS, [toggle_event(PERSON, "photo", gone.photo_id, False,
                                              gone.taken_at + timedelta(days=30))])
    ing.run_until_caught_up()
    second = latest_manifest(bs, PERSON)
    assert second.version == first.version + 1 and second.style_code != first.style_code
    assert gone.photo_id not in {p.photo_id for p in second.photos}
    assert photos_in_set(second, [gone.path]) == {gone.path: None}
    assert photos_in_set(first, [gone.path]) == {gone.path: gone.photo_id}
    assert verify(second, files, clip).vector_matches
    tampered = second.model_copy(update={"photos": [*second.photos, first.photos[0]]})
    assert not verify(tampered, files, clip).code_matches  # a manifest cannot hide a photo it counted

    # 3. What shaped the style names photos and albums, never pixels
    explained = CliRunner().invoke(app, ["style", "explain", PERSON, "-b", bs, "--format", "json"])
    assert explained.exit_code == 0, explained.output
    rows = json.loads(explained.output)
    assert {r["photo_id"] for r in rows} <= {p.photo_id for p in second.photos}
    assert {"warmth", "saturation", "overall"} <= {r["part"] for r in rows}

    # 4. Serving generates with the style and names its code
    images = tmp_path / "images"
    worker = Worker(ServeConfig(bs, str(images)), StyleGenerator(diffusion, clip, device="cpu"))
    generate(bs, worker, PERSON, "r1")
    [result] = [parse_event(GENERATION_RESULTS, m.value) for m in read_topic(bs, GENERATION_RESULTS)]
    assert result.type == "generation_completed" and result.style_code == second.style_code
    assert (images / PERSON / "r1.png").exists()

    # 5. Forget the person: exactly once, with a receipt that verifies and names no one. A request
    #    they made before it is still queued for serving.
    produce(bs, GENERATION_REQUESTS, [GenerationRequested(
        event_id="e-r2", user_id=PERSON, event_time=datetime.now(UTC), request_id="r2", prompt="a card")])
    asked = CliRunner().invoke(app, ["forget", PERSON, "-b", bs])
    assert asked.exit_code == 0, asked.output
    ing.run_until_caught_up()
    produce(bs, CONSENT_EVENTS, [parse_event(CONSENT_EVENTS, m.value) for m in read_topic(bs, CONSENT_EVENTS)
                                 if b"user_forgotten" in m.value])  # the request delivered twice
    ing.run_until_caught_up()  # ...is void: no second erasure, no second receipt
    [raw] = [m.value for m in read_topic(bs, ERASURE_RECEIPTS)]
    receipt = ErasureReceipt.model_validate_json(raw)
    public = load_or_create_signing_key(ing.cfg.state_dir).public_key()
    assert verify_receipt(receipt, public)
    assert not verify_receipt(receipt.model_copy(update={"deleted": {"state": {}}}), public)
    assert receipt.deleted["state"]["catalogued photo references"] == 5
    assert receipt.deleted["state"]["style versions"] == 1  # the first counted the withdrawn photo
    assert receipt.deleted["history"]["style versions"] == 1  # ...and left the history then
    assert PERSON.encode() not in raw
    receipt_file = tmp_path / "receipt.json"
    receipt_file.write_bytes(raw)
    checked = CliRunner().invoke(app, ["receipt", "verify", str(receipt_file), "--data-dir", str(tmp_path)])
    assert checked.exit_code == 0 and "valid" in checked.output, checked.output
    receipt_file.write_bytes(raw.replace(b'"style versions":1', b'"style versions":0'))
    checked = CliRunner().invoke(app, ["receipt", "verify", str(receipt_file), "--data-dir", str(tmp_path)])
    assert checked.exit_code == 1 and "INVALID" in checked.output, checked.output

    # 6. Serving drops them (style, images, results) and the request they made before is void
    assert worker.run(max_requests=1, idle_exit_s=30) == 1
    assert worker.styles.get(PERSON) is None and not (images / PERSON).exists()
    assert [parse_event(GENERATION_RESULTS, m.value).request_id for m in read_topic(bs, GENERATION_RESULTS)] == ["r1"]
    worker.close()

    # 7. Nothing of them anywhere the project writes: the broker removes what is left by itself, in a
    #    stated time, and the input topics are the photo service's
    ing.close()
    state = StateLayout(ing.cfg.state_dir)
    findings = audit(state, images, needles_for([PERSON], [], state), bs, users=[PERSON])
    assert [f for f in findings if f.violation] == []
    pending = {}
    for f in findings:
        pending[f.store] = pending.get(f.store, "") + f.pending
    assert "awaits compaction" in pending["topic style-vectors"] and "tombstone" in pending["topic style-manifests"]
    assert "retention" in pending["topic generation-results"] and "input topic" in pending["topic photo-events"]
    with Store(state.db) as s:
        assert s.latest_vectors().keys() == {"olaf"}

    # 8. Uploading again later starts from nothing; an upload from before the erasure arriving late
    #    counts for nothing
    again = make_ingestor()
    produce(bs, PHOTO_EVENTS, [mine[1].upload_event(event_time=datetime.now(UTC)), mine[2].upload_event()])
    again.run_until_caught_up()
    fresh = latest_styles(bs)[PERSON]
    [tombstone] = [v for v in (parse_event(STYLE_VECTORS, m.value) for m in read_topic(bs, STYLE_VECTORS)
                               if m.value is not None) if v.tombstone]
    # numbered after the tombstone: no version number of theirs names two styles
    assert (fresh.version, fresh.photo_count) == (tombstone.version + 1, 1)


def test_a_forget_deletes_one_folder_whatever_the_id(tmp_path):
    out = OutputStore(str(tmp_path / "images"))
    for user in ("ana", "..", ".", "a/../.."):
        request = GenerationRequested(event_id="e", user_id=user, event_time=datetime.now(UTC), request_id="r",
                                      prompt="p")
        out.record(request, GenerationFailed(event_id="f", user_id=user, event_time=datetime.now(UTC),
                                             request_id="r", reason="test"))
    for user in ("..", ".", "a/../.."):
        out.forget(user)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["ana"]
    assert (tmp_path / "images" / "ana" / "r.json").exists()


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
    ing.close()

    log = tmp_path / "test.log"
    log.write_text(caplog.text)
    state = StateLayout(ing.cfg.state_dir)
    findings = audit(state, tmp_path / "images", needles_for([], planted, state), bs, extra=[log])
    assert findings == []
    # ...and the audit does find what is there: the photos themselves hold every planted value and are
    # image bytes, and the dead letter names the photo's file
    found = audit(state, tmp_path / "images", needles_for([], planted, state), bs, extra=[tmp_path / "lib"])
    assert {f.what for f in found} >= {*planted[:3], "JPEG image bytes"}
    assert np.all([f.violation for f in found])


@pytest.mark.slow
def test_erasures_wait_to_share_one_rewrite_of_the_state_file_and_their_receipts_follow_it(broker, make_ingestor,
                                                                                             tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ann-1c": [("a", "warm", 2)], "bo-2d": [("b", "cool", 2)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    ing = make_ingestor(erasure_batch_s=3600)
    ing.run_until_caught_up()
    db = StateLayout(ing.cfg.state_dir).db
    before = db.stat().st_ino

    def forget(user: str) -> None:
        produce(bs, CONSENT_EVENTS, [UserForgotten(event_id=f"forget-{user}", user_id=user,
                                                   event_time=datetime.now(UTC))])
        assert ing.run_cycle() is not None

    # 1. Each forget commits (their state is gone), but the file waits for its rewrite, and so do the receipts
    forget("ann-1c")
    forget("bo-2d")
    assert not {"ann-1c", "bo-2d"} & latest_styles(bs).keys()
    assert ing._store.compaction_due() is not None and db.stat().st_ino == before
    assert read_topic(bs, ERASURE_RECEIPTS) == []
    # 2. Caught up, the run ends with the one rewrite; then both receipts go out
    ing.run_until_caught_up()
    assert ing._store.compaction_due() is None and db.stat().st_ino != before
    receipts = [ErasureReceipt.model_validate_json(m.value) for m in read_topic(bs, ERASURE_RECEIPTS)]
    assert len(receipts) == 2
    public = load_or_create_signing_key(ing.cfg.state_dir).public_key()
    assert all(verify_receipt(r, public) for r in receipts)


def test_the_state_database_keeps_to_its_memory_limit(tmp_path):
    """The forget's rewrite copies everyone's state: DuckDB's default pool (80 % of the machine) let it
    hold 5.5 GB at 100 k people; the state file's connection spills past its limit instead."""
    with Store(tmp_path / "state.duckdb") as store:
        [(limit,)] = store.db.execute("SELECT current_setting('memory_limit')").fetchall()
    assert limit == "2.7 GiB"  # 3 GB


def test_a_rewrite_copies_every_table_index_and_row_in_pieces_and_leaves_no_erased_byte(tmp_path, monkeypatch):
    """At 1 M people the rewrite failed at its commit: one transaction held all the new indexes, past
    the memory limit. Here the same failure at a small scale: 200 k photos under a 16 MB limit, which
    one `COPY FROM DATABASE` cannot commit, copied 20 k rows at a time."""
    monkeypatch.setattr(forgetting, "COPY_ROWS", 20_000)
    path = tmp_path / "state.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute("CREATE TABLE photos (user_id VARCHAR, photo_id VARCHAR, note VARCHAR NOT NULL, n BIGINT "
                   "DEFAULT 7, PRIMARY KEY (user_id, photo_id))")
        db.execute("CREATE INDEX photos_user ON photos (user_id)")
        db.execute("CREATE TABLE empty (x INTEGER)")
        db.execute("INSERT INTO photos (user_id, photo_id, note) "
                   "SELECT 'user-' || (i // 20), 'photo-' || i, 'note ' || i FROM range(200000) t(i)")
        db.execute("INSERT INTO photos VALUES ('erased', 'p', 'ERASED-PERSON-MARKER', 1)")
        db.execute("CHECKPOINT")
        # gaps in the rowids, within pieces and across their bounds
        db.execute("DELETE FROM photos WHERE user_id = 'erased' "
                   "OR photo_id IN ('photo-5', 'photo-19999', 'photo-20000')")
        schema = ("SELECT table_name, sql FROM duckdb_tables() UNION ALL "
                  "SELECT index_name, sql FROM duckdb_indexes() ORDER BY ALL")
        rows = ("SELECT count(*), sum(hash(i, user_id, photo_id, note, n)) FROM ("  # every row, in order
                "SELECT row_number() OVER (ORDER BY rowid) AS i, * FROM photos)")
        before = db.execute(schema).fetchall(), db.execute(rows).fetchall()
    assert b"ERASED-PERSON-MARKER" in path.read_bytes()

    forgetting.rewrite_database(duckdb.connect(str(path), config={"memory_limit": "16MB"}), path)

    with duckdb.connect(str(path)) as db:
        assert (db.execute(schema).fetchall(), db.execute(rows).fetchall()) == before
        assert before[1][0][0] == 200_000 - 3
        assert db.execute("SELECT count(*) FROM empty").fetchone() == (0,)
        with pytest.raises(duckdb.ConstraintException):  # the primary key holds in the copy
            db.execute("INSERT INTO photos VALUES ('user-3', 'photo-60', 'again', 1)")
    assert b"ERASED-PERSON-MARKER" not in path.read_bytes()
