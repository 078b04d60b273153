"""The per-user update rule as pure functions: statistics, consent, retraction, offset planning."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import numpy as np

from stylestream.demo.synthetic import toggle_event
from stylestream.pipelines.ingest import plan_ranges
from stylestream.schemas.events import PhotoDeleted
from stylestream.transforms.kafka_read import OffsetRange
from stylestream.transforms.records import Contribution, UserBatch
from stylestream.transforms.style import (
    StoredContribution,
    StyleStats,
    UserView,
    photo_weight,
    plan_user_update,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
rng = np.random.default_rng(0)


def contribution(i: int, album: str = "a") -> Contribution:
    e = rng.normal(size=8).astype(np.float32)
    return Contribution("ana", f"p{i}", album, T0 + timedelta(days=30 * i), e / np.linalg.norm(e),
                        rng.random(3).astype(np.float32))


def empty_view() -> UserView:
    return UserView(StyleStats.zero(8, 3), 0, {}, {}, set())


def apply(view: UserView, batch: UserBatch) -> UserView:
    """What the store does with an update, in memory."""
    u = plan_user_update(view, batch, 365.0)
    stored = {k: v for k, v in view.stored.items() if k not in u.remove}
    stored |= {c.photo_id: StoredContribution(c.album_id, w, c.embedding, c.features) for c, w in u.add}
    return UserView(u.stats, view.version + u.changes_style, view.consent | u.consent, stored,
                    view.deleted | set(u.tombstones))


def test_weight_doubles_per_half_life():
    assert photo_weight(T0 + timedelta(days=365), 365) / photo_weight(T0, 365) == 2.0


def test_stats_add_and_retract_exactly():
    cs = [contribution(i) for i in range(5)]
    parts = [StyleStats.of(c.embedding, c.features, photo_weight(c.taken_at, 365)) for c in cs]
    total = sum(parts[1:], parts[0])
    without_two = total - parts[2]
    direct = sum([p for i, p in enumerate(parts) if i != 2][1:], parts[0])
    np.testing.assert_allclose(without_two.vector()[0], direct.vector()[0], atol=1e-6)
    emptied = total - parts[0] - parts[1] - parts[2] - parts[3] - parts[4]
    assert emptied.count == 0 and not emptied.sum_embedding.any()


def test_any_arrival_order_gives_the_same_style():
    ups = [contribution(i, "a" if i < 3 else "b") for i in range(5)]
    events = [("up", c) for c in ups] + [
        ("toggle", toggle_event("ana", "album", "b", False, T0 + timedelta(days=400))),
        ("toggle", toggle_event("ana", "album", "b", True, T0 + timedelta(days=10))),  # older: loses
        ("delete", PhotoDeleted(event_id="d", user_id="ana", event_time=T0 + timedelta(days=5), photo_id="p0")),
    ]
    results = []
    for order in itertools.islice(itertools.permutations(events), 0, 5040, 97):
        view = empty_view()
        for kind, e in order:  # one event per cycle: the hardest case for ordering
            batch = UserBatch("ana")
            {"up": batch.uploads, "toggle": batch.toggles, "delete": batch.deletes}[kind].append(e)
            view = apply(view, batch)
        results.append((sorted(view.stored), view.stats.vector()[0]))
    for stored, vec in results:
        assert stored == ["p1", "p2"]
        np.testing.assert_allclose(vec, results[0][1], atol=1e-6)


def test_plan_ranges_reads_only_new_offsets_in_bounded_steps():
    committed = {("photo-events", 0): 10, ("photo-events", 1): 5}
    ends = {("photo-events", 0): 10, ("photo-events", 1): 12, ("consent-events", 0): 3}
    assert plan_ranges(committed, ends, max_per_partition=4) == [
        OffsetRange("consent-events", 0, 0, 3), OffsetRange("photo-events", 1, 5, 9)]
