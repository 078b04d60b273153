"""Ingestion end to end: real broker, real Beam pipeline, real DuckDB and Parquet, real open_clip."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import produce, read_topic
from typer.testing import CliRunner

from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.cli.main import app
from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.pipelines.store import Store
from stylestream.schemas.events import parse_event
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_VECTORS, dlq, ensure_topics

LATER = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def library(tmp_path):
    return make_library(tmp_path / "library", {
        "ana": [("beach", "warm", 4), ("office", "cool", 3)],
        "ben": [("walks", "mono", 3)],
    })


def latest(ingestor):
    with Store(ingestor.cfg.db_path) as s:
        return s.latest_vectors()


@pytest.mark.smoke
def test_upload_changes_its_user_and_no_one_else(broker, make_ingestor, library, tmp_path):
    bs = broker.bootstrap_servers
    extra = library.pop()  # one of ben's photos, uploaded later
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in library])
    ing = make_ingestor()
    assert len(ing.run_until_caught_up()) == 1
    before = latest(ing)
    assert {u: v[3] for u, v in before.items()} == {"ana": 7, "ben": 2}

    produce(bs, PHOTO_EVENTS, [extra.upload_event()])
    [cycle] = ing.run_until_caught_up()
    assert cycle.users_updated == 1
    after = latest(ing)
    assert after["ana"][0] == before["ana"][0]
    np.testing.assert_array_equal(after["ana"][1], before["ana"][1])
    assert after["ben"][0] == before["ben"][0] + 1 and after["ben"][3] == 3
    assert not np.allclose(after["ben"][1], before["ben"][1])

    # Every committed version reached the history and the style-vectors topic exactly once.
    history = pq.read_table(ing.cfg.history_dir).to_pylist()
    key = load_or_create_key(ing.cfg.state_dir)  # the history holds pseudonyms, never the user ids
    assert sorted((r["user_id"], r["version"]) for r in history) == sorted(
        [(pseudonym("ana", key), 1), (pseudonym("ben", key), 1), (pseudonym("ben", key), 2)])
    assert not {"ana", "ben"} & {r["user_id"] for r in history}
    published = [parse_event(STYLE_VECTORS, m.value) for m in read_topic(bs, STYLE_VECTORS)]
    assert sorted((v.user_id, v.version) for v in published) == [("ana", 1), ("ben", 1), ("ben", 2)]
    assert np.allclose(next(v for v in published if v.version == 2).embedding, after["ben"][1], atol=1e-7)


def test_album_opt_out_equals_vector_from_scratch(broker, make_ingestor, library):
    bs = broker.bootstrap_servers
    ana = [p for p in library if p.user_id == "ana"]
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in ana])
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "office", False, LATER)])
    withdrawn = make_ingestor("withdrawn")
    withdrawn.run_until_caught_up()
    v_withdrawn = latest(withdrawn)["ana"]
    assert v_withdrawn[3] == 4

    # From scratch: a separate broker and state that only ever see the photos outside the album.
    v_scratch = ingest_alone([p for p in ana if p.album_id != "office"], withdrawn.cfg, broker.engine)["ana"]
    assert v_scratch[3] == 4
    np.testing.assert_allclose(v_withdrawn[1], v_scratch[1], atol=1e-6)
    np.testing.assert_allclose(v_withdrawn[2], v_scratch[2], atol=1e-6)
    with Store(withdrawn.cfg.db_path) as s:
        assert {p for p, *_ in s.contributions("ana")} == {p.photo_id for p in ana if p.album_id == "beach"}


def ingest_alone(photos, like: IngestConfig, engine: str) -> dict:
    """The styles from `photos` alone, on a broker of their own."""
    with start_local_broker(engine, like.state_dir.parent / "other-broker") as other:
        ensure_topics(other.bootstrap_servers)
        produce(other.bootstrap_servers, PHOTO_EVENTS, [p.upload_event() for p in photos])
        cfg = IngestConfig(other.bootstrap_servers, like.state_dir.parent / "from-scratch", like.clip)
        with Ingestor(cfg) as ing:
            ing.run_until_caught_up()
            return latest(ing)


@pytest.mark.smoke
def test_malformed_events_go_to_dlq_and_good_ones_count(broker, make_ingestor, library):
    bs = broker.bootstrap_servers
    ben = [p for p in library if p.user_id == "ben"]
    bad_sha = ben[0].upload_event().model_copy(update={"photo_id": "ben-corrupt"})
    bad_sha = bad_sha.model_copy(update={"image": bad_sha.image.model_copy(update={"sha256": "0" * 64})})
    malformed = [
        (b"ben", b"{not json"),
        (b"ben", json.dumps({"type": "photo_uploaded", "user_id": "ben", "event_id": "x",
                             "event_time": "2026-01-01T00:00:00Z", "photo_id": "p"}).encode()),
    ]
    produce(bs, PHOTO_EVENTS, [malformed[0], *(p.upload_event() for p in ben), malformed[1], bad_sha])
    [cycle] = make_ingestor().run_until_caught_up()
    assert cycle.events == 6 and cycle.dead_letters == 3

    letters = [json.loads(m.value) for m in read_topic(bs, dlq(PHOTO_EVENTS))]
    reasons = sorted(d["reason"] for d in letters)
    assert any("Invalid JSON" in r for r in reasons)
    assert any("a photo needs `image`" in r for r in reasons)
    assert any("sha256" in r for r in reasons)
    for d in letters:
        assert d["source"]["topic"] == PHOTO_EVENTS and d["original_base64"]
    assert latest(make_ingestor())["ben"][3] == 3  # all good photos counted, the corrupt one not

    runner = CliRunner(env={"COLUMNS": "300"})  # `stylestream dlq`: the same letters, for people and tools
    listed = json.loads(runner.invoke(app, ["dlq", "-b", bs, "--format", "json"]).stdout)
    assert sorted(r["reason"] for r in listed) == reasons
    assert {r["offset"] for r in listed} == {0, 4, 5} and {r["preview"] for r in listed} >= {"{not json"}
    table = runner.invoke(app, ["dlq", "-b", bs, "--topic", PHOTO_EVENTS, "--last", "1"])
    assert table.exit_code == 0 and "photo-events[" in table.stdout and "newest 1" in table.stdout
    assert runner.invoke(app, ["dlq", "-b", bs, "--topic", "nope"]).exit_code == 2


def test_running_again_over_the_same_events_changes_nothing(broker, make_ingestor, library):
    bs = broker.bootstrap_servers
    uploads = [p.upload_event() for p in library]
    produce(bs, PHOTO_EVENTS, uploads)
    ing = make_ingestor()
    ing.run_until_caught_up()
    before = latest(ing)

    assert ing.run_cycle() is None  # nothing new: no cycle at all
    produce(bs, PHOTO_EVENTS, uploads)  # the same events delivered again
    [again] = ing.run_until_caught_up()
    assert again.events == len(uploads) and again.users_updated == 0
    after = latest(ing)
    assert {u: v[0] for u, v in after.items()} == {u: v[0] for u, v in before.items()}
    for u in before:
        np.testing.assert_array_equal(after[u][1], before[u][1])
    assert len(read_topic(bs, STYLE_VECTORS)) == len(before)


def test_re_enabled_album_brings_its_photos_back_through_reingestion(broker, make_ingestor, library):
    bs = broker.bootstrap_servers
    ana = [p for p in library if p.user_id == "ana"]
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in ana])
    ing = make_ingestor()
    ing.run_until_caught_up()
    full = latest(ing)["ana"]
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "office", False, LATER)])
    ing.run_until_caught_up()
    assert latest(ing)["ana"][3] == 4
    with Store(ing.cfg.db_path) as s:  # withdrawn: the contributions are gone, not flagged
        assert len(s.contributions("ana")) == 4

    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "office", True, LATER.replace(month=4))])
    cycles = ing.run_until_caught_up()
    assert len(cycles) == 2  # the opt-in, then the re-published uploads of the album's photos
    back = latest(ing)["ana"]
    assert back[3] == 7 and back[0] == full[0] + 2
    np.testing.assert_allclose(back[1], full[1], atol=1e-6)
