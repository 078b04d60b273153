"""The API's read model tells what ingestion does: switches folded by ingestion's own rule (times in
UTC whatever their offsets, the later wins whatever the arrival order, both user-scope forms), and what
a person sent before their erasure is void on the page as in ingestion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from helpers import produce, read_topic

from stylestream.api import views
from stylestream.api.follower import fold
from stylestream.api.store import ApiStore
from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.pipelines.store import Store
from stylestream.schemas.events import UserForgotten, parse_event
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_MANIFESTS, STYLE_VECTORS

T = datetime(2026, 3, 1, tzinfo=UTC)


def at(hour: int, offset_h: int = 0) -> datetime:
    """T's day at `hour` local time in UTC+`offset_h`."""
    return T.replace(hour=hour, tzinfo=timezone(timedelta(hours=offset_h)))


@pytest.fixture
def library(tmp_path):
    return make_library(tmp_path / "library", {"ana": [("a", "warm", 2), ("b", "cool", 2)],
                                               "ben": [("c", "mono", 2)]}, start=T - timedelta(days=30))


def test_the_page_shows_the_photos_ingestion_counted(broker, make_ingestor, library, tmp_path):
    bs = broker.bootstrap_servers
    ana_b1 = next(p for p in library if p.album_id == "b").photo_id
    ben_late = next(p for p in library if p.user_id == "ben")
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in library if p is not ben_late])
    produce(bs, CONSENT_EVENTS, [
        # Album a: off at 08:00 UTC (written as 10:00+02:00), on at 09:30 UTC, which arrives first.
        toggle_event("ana", "album", "a", True, at(9, 0) + timedelta(minutes=30)),
        toggle_event("ana", "album", "a", False, at(10, 2)),
        # Photo b1: off at 12:00 UTC (07:00-05:00), then an earlier "on" (11:00 UTC) arrives.
        toggle_event("ana", "photo", ana_b1, False, at(7, -5)),
        toggle_event("ana", "photo", ana_b1, True, at(11, 0)),
        # The whole person: off, then on again in the other form the contract allows (scope_id = user).
        toggle_event("ana", "user", None, False, at(5, 0)),
        toggle_event("ana", "user", "ana", True, at(6, 0)),
        # Ben asks to be forgotten; an upload of his from before the request arrives after it.
        UserForgotten(event_id="forget-ben", user_id="ben", event_time=at(13, 0)),
    ])
    produce(bs, PHOTO_EVENTS, [ben_late.upload_event(event_time=at(12, 0))])

    # 1. Ingestion's count.
    ing = make_ingestor()
    ing.run_until_caught_up()
    with Store(ing.cfg.db_path) as s:
        counted = {u: v.photo_count for u, v in s.latest_vectors().items()}
    assert counted == {"ana": 3}
    [manifest] = [parse_event(STYLE_MANIFESTS, m.value) for m in read_topic(bs, STYLE_MANIFESTS)
                  if m.key == b"ana" and m.value]

    # 2. The API's read model, folded from the same topics (consent first: Ben's upload comes after
    #    his forget request, as his late one did, and must not show).
    store = ApiStore(tmp_path / "api" / "api.sqlite3")
    try:
        with store.transaction() as db:
            for topic in (CONSENT_EVENTS, PHOTO_EVENTS, STYLE_VECTORS, STYLE_MANIFESTS):
                for m in read_topic(bs, topic):
                    fold(db, store, m)
        photos = views.photos(store.photos("ana"), store.consent("ana"))
        albums = views.albums(store.photos("ana"), store.consent("ana"))
        assert {p["photo_id"] for p in photos if p["learning"]} == {p.photo_id for p in manifest.photos}
        assert albums["learning"] and all(a["learning"] for a in albums["albums"])
        assert store.photos("ben") == []  # void, as ingestion voided it
        assert store.manifest("ana")["version"] == manifest.version
    finally:
        store.close()


def test_an_older_read_model_is_carried_over_and_a_repeated_forget_deletes_nothing_new(tmp_path):
    import sqlite3

    from stylestream.schemas.events import encode_event
    from stylestream.streams.clients import Message

    path = tmp_path / "api" / "api.sqlite3"
    path.parent.mkdir()
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE switches (user_id TEXT, scope TEXT, scope_id TEXT, enabled INTEGER, changed_at TEXT);
        CREATE TABLE styles (user_id TEXT PRIMARY KEY, version INTEGER, event TEXT);
        CREATE TABLE manifests (user_id TEXT PRIMARY KEY, version INTEGER, event TEXT);
        INSERT INTO switches VALUES ('ana', 'album', 'a', 0, '2026-03-01T08:00:00+00:00');
        INSERT INTO switches VALUES ('ana', 'user', '', 1, '2026-03-01T06:00:00+00:00');
        INSERT INTO styles VALUES ('ana', 3, '{"version": 3}');
        INSERT INTO manifests VALUES ('ana', 3, '{"version": 3}');""")
    old.commit()
    old.close()
    store = ApiStore(path)
    try:
        consent = store.consent("ana")
        assert {k: r.enabled for k, r in consent.items()} == {"album:a": False, "user:": True}
        assert store.style("ana") == {"version": 3} and store.manifest("ana") == {"version": 3}

        # Ben is forgotten, comes back, and the same request is read again: what he has now stays.
        forget = UserForgotten(event_id="forget-ben", user_id="ben", event_time=at(13, 0))
        message = Message(CONSENT_EVENTS, 0, 0, b"ben", encode_event(forget), 0)
        comeback = toggle_event("ben", "album", "c", False, at(14, 0))
        with store.transaction() as db:
            assert fold(db, store, message)
            fold(db, store, Message(CONSENT_EVENTS, 0, 1, b"ben", encode_event(comeback), 0))
            assert not fold(db, store, message)  # a replay: void
        assert set(store.consent("ben")) == {"album:c"}
    finally:
        store.close()
