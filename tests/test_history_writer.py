"""The streaming runners' history writer (pipelines/history_writer.py) against a real broker: every
committed version once, withdrawn ones removed, a forgotten person erased beside the state with a
signed receipt that counts what was deleted."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
from helpers import read_topic

from stylestream.analytics.pseudonyms import pseudonym
from stylestream.pipelines.history_writer import HistoryWriter
from stylestream.pipelines.plan import Erasure, new_version
from stylestream.pipelines.settings import IngestSettings
from stylestream.privacy.erasure import load_signing_key, verify_receipt
from stylestream.schemas.events import UserForgotten, parse_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams import clients
from stylestream.streams.topics import ERASURE_RECEIPTS
from stylestream.transforms.style import StoredContribution, StyleStats

NOW = datetime(2026, 3, 1, tzinfo=UTC)
DIM = 8


def version(settings: IngestSettings, user: str, number: int, photos: int, withdrawn: list[int] = ()) -> list:
    rng = np.random.default_rng(number * 7 + len(user))
    stored = {f"{user}-p{i}": StoredContribution("a", 1.0, rng.normal(size=DIM), rng.random(len(FEATURE_NAMES)),
                                                 number, "0" * 64) for i in range(photos)}
    stats = sum((StyleStats.of(c.embedding, c.features, c.weight) for c in stored.values()),
                StyleStats.zero(DIM, len(FEATURE_NAMES)))
    return new_version(user, number, stats, stored, list(withdrawn), settings.basis, NOW).messages()


def history(settings: IngestSettings) -> list[tuple[str, int, int]]:
    rows = pq.read_table(settings.state.history).to_pylist()
    return sorted((r["user_id"], r["version"], r["photo_count"]) for r in rows)


def test_the_history_writer_writes_committed_versions_once_and_carries_out_erasures(broker, clip, tmp_path):
    bs = broker.bootstrap_servers
    settings = IngestSettings(tmp_path, clip_pretrained=clip.pretrained)
    settings.ensure_keys(say=lambda _: None)
    key = settings.analytics_key()
    ana, ben = pseudonym("ana", key), pseudonym("ben", key)

    # 1. Versions: ana's second withdraws her first; ben has one.
    clients.send_all(bs, [*version(settings, "ana", 1, 2), *version(settings, "ben", 1, 3),
                          *version(settings, "ana", 2, 1, withdrawn=[1])])
    with HistoryWriter(bs, settings) as writer:
        writer.run(threading.Event(), follow=False)
    assert history(settings) == sorted([(ana, 2, 1), (ben, 1, 3)])
    # 2. Ben is forgotten: his tombstones, as a runner publishes them, carry the request.
    request = UserForgotten(event_id="forget-17", user_id="ben", event_time=NOW)
    clients.send_all(bs, Erasure("ben", [request], 1, NOW).messages({"catalogued photo references": 3}, NOW))
    with HistoryWriter(bs, settings) as writer:
        writer.run(threading.Event(), follow=False)
        writer.run(threading.Event(), follow=False)  # again: nothing new, nothing twice
    assert history(settings) == [(ana, 2, 1)]
    [receipt] = [parse_event(ERASURE_RECEIPTS, m.value) for m in read_topic(bs, ERASURE_RECEIPTS)]
    assert receipt.request_event_id == "forget-17"
    assert verify_receipt(receipt, load_signing_key(settings.state.root).public_key())
    assert receipt.deleted["state"] == {"catalogued photo references": 3}
    assert receipt.deleted["history"] == {"style versions": 1}
    assert b"ben" not in settings.state.history_writer.read_bytes()  # the file was rewritten after the erasure
