"""The distributed-runner pipeline (per-user state in the runner), run bounded on FnApiRunner, gives
the same styles as the local micro-batch driver over the same events."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import produce

from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.models.clip import embedding_dim
from stylestream.pipelines.ingest import plan_ranges
from stylestream.pipelines.store import Store
from stylestream.pipelines.streaming import run_bounded
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS


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
    run_bounded(bs, ranges, clip, embedding_dim(clip), len(FEATURE_NAMES), str(tmp_path / "stream" / "history"), key)
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
