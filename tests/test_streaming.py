"""The distributed-runner pipeline (per-user state in the runner), run bounded on FnApiRunner, gives
the same styles as the local micro-batch driver over the same events."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import produce, read_topic

from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.models.clip import embedding_dim
from stylestream.pipelines.ingest import plan_ranges
from stylestream.pipelines.store import Store
from stylestream.pipelines.streaming import run_bounded
from stylestream.schemas.events import StyleVectorUpdated, parse_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_VECTORS


@pytest.mark.smoke
def test_streaming_pipeline_matches_the_local_driver(broker, make_ingestor, clip, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 4), ("b", "cool", 3)],
                                             "ben": [("c", "mono", 4)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos] + [photos[-1].delete_event(datetime.now(UTC))])
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "b", False, datetime(2026, 1, 1, tzinfo=UTC))])
    ing = make_ingestor()
    ing.run_until_caught_up()
    with Store(ing.cfg.db_path) as s:
        local = s.latest_vectors()
    ranges = plan_ranges({}, ing.end_offsets(), 10_000)  # everything, from the start

    key = load_or_create_key(ing.cfg.state_dir)
    run_bounded(bs, ranges, clip, embedding_dim(clip), len(FEATURE_NAMES), str(tmp_path / "stream" / "history"), key,
                vectors_prefix=str(tmp_path / "vectors" / "events"))
    rows = pq.read_table(tmp_path / "stream").to_pylist()
    latest = {}
    for r in rows:
        if r["version"] > latest.get(r["user_id"], {"version": 0})["version"]:
            latest[r["user_id"]] = r
    assert set(latest) == {pseudonym(u, key) for u in local} and set(local) == {"ana", "ben"}
    latest = {u: latest[pseudonym(u, key)] for u in local}  # the history holds pseudonyms only
    for user, (_, emb, feat, count) in local.items():
        assert latest[user]["photo_count"] == count
        np.testing.assert_allclose(latest[user]["embedding"], emb, atol=1e-6)
        np.testing.assert_allclose(latest[user]["features"], feat, atol=1e-6)
    assert latest["ana"]["photo_count"] == 4 and latest["ben"]["photo_count"] == 3

    # The style-vector events both paths publish, field by field (the version numbers count events,
    # which the two paths group differently: one per cycle here, one per event there).
    published = [parse_event(STYLE_VECTORS, m.value) for m in read_topic(bs, STYLE_VECTORS)]
    streamed = [StyleVectorUpdated.model_validate_json(line) for f in (tmp_path / "vectors").iterdir()
                for line in f.read_text().splitlines()]
    for user in ("ana", "ben"):
        want = max((e for e in published if e.user_id == user), key=lambda e: e.version)
        got = max((e for e in streamed if e.user_id == user), key=lambda e: e.version)
        assert got.photo_count == want.photo_count and len(got.facets) == len(want.facets) >= 1
        np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-6)
        assert got.features.keys() == want.features.keys()
        np.testing.assert_allclose(list(got.features.values()), list(want.features.values()), atol=1e-6)
        for g, w in zip(got.facets, want.facets, strict=True):
            assert g.photo_count == w.photo_count and abs(g.weight_share - w.weight_share) < 1e-6
            np.testing.assert_allclose(g.embedding, w.embedding, atol=1e-6)
            np.testing.assert_allclose(list(g.features.values()), list(w.features.values()), atol=1e-6)
