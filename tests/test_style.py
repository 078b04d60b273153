"""The per-user update rule as pure functions: statistics, consent, retraction, offset planning."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import numpy as np

from stylestream.demo.synthetic import toggle_event
from stylestream.schemas.events import PhotoDeleted, PhotoUploaded
from stylestream.transforms.kafka_read import OffsetRange, plan_ranges
from stylestream.transforms.records import Contribution, UserBatch
from stylestream.transforms.style import (
    StyleStats,
    UserView,
    apply_update,
    photo_weight,
    plan_user_update,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
rng = np.random.default_rng(0)


def contribution(i: int, album: str = "a") -> Contribution:
    e = rng.normal(size=8).astype(np.float32)
    upload = PhotoUploaded(event_id=f"up{i}", user_id="ana", event_time=T0, photo_id=f"p{i}", album_id=album,
                           taken_at=T0 + timedelta(days=30 * i), inline_base64="AA==")
    return Contribution(upload, e / np.linalg.norm(e), rng.random(3).astype(np.float32))


def empty_view() -> UserView:
    return UserView(StyleStats.zero(8, 3), 0, {}, {}, set(), {})


def apply(view: UserView, batch: UserBatch, embedded: dict[str, Contribution] | None = None) -> UserView:
    """An update applied in memory (the whole user is in view), then what the next cycles do.
    Photos listed for re-ingestion are embedded again from `embedded` and applied, as the pipeline does."""
    u = plan_user_update(view, batch, 365.0)
    after = apply_update(view, u)
    if u.reingest:
        embedded = embedded or {c.photo_id: c for c in PHOTOS}
        after = apply(after, UserBatch("ana", contributions=[embedded[p] for p in u.reingest]), embedded)
    return after


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
            {"up": batch.contributions, "toggle": batch.toggles, "delete": batch.deletes}[kind].append(e)
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


# ----------------------------------------------------------------------------- properties (hypothesis)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def batch_of(events) -> UserBatch:
    b = UserBatch("ana")
    for kind, e in events:
        {"up": b.contributions, "toggle": b.toggles, "delete": b.deletes}[kind].append(e)
    return b


def run_cycles(events, cuts) -> UserView:
    """Apply events in this order, split into cycles at the given cut points."""
    view, start = empty_view(), 0
    for end in [*sorted(set(cuts)), len(events)]:
        view = apply(view, batch_of(events[start:end]))
        start = end
    return view


def assert_same_style(a: UserView, b: UserView):
    assert sorted(a.stored) == sorted(b.stored)
    np.testing.assert_allclose(a.stats.vector()[0], b.stats.vector()[0], atol=1e-6)
    np.testing.assert_allclose(a.stats.vector()[1], b.stats.vector()[1], atol=1e-6)


PHOTOS = [contribution(i, "a" if i % 2 else "b") for i in range(6)]


@st.composite
def histories(draw):
    ups = [("up", c) for c in draw(st.lists(st.sampled_from(PHOTOS), min_size=1, max_size=8))]
    scopes = st.sampled_from([("album", "a"), ("album", "b"), ("photo", "p1"), ("photo", "p2"), ("user", None)])
    toggles = [("toggle", toggle_event("ana", scope, sid, enabled, T0 + timedelta(hours=hours), event_id=f"t{n}"))
               for n, ((scope, sid), enabled, hours) in enumerate(draw(st.lists(st.tuples(
                   scopes, st.booleans(), st.integers(0, 1000)), max_size=4)))]
    deletes = [("delete", PhotoDeleted(event_id=f"d{c.photo_id}", user_id="ana", event_time=T0, photo_id=c.photo_id))
               for c in draw(st.lists(st.sampled_from(PHOTOS), max_size=2))]
    return ups + toggles + deletes


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.lists(st.integers(0, 14), max_size=4))
def test_any_order_and_any_cycle_split_give_the_same_state(events, rnd, cuts):
    reference = run_cycles(events, [])
    shuffled = list(events)
    rnd.shuffle(shuffled)
    assert_same_style(run_cycles(shuffled, [c for c in cuts if c < len(events)]), reference)
    # ...and the same as computing the style from scratch over what is stored.
    scratch = StyleStats.zero(8, 3)
    for s in reference.stored.values():
        scratch = scratch + StyleStats.of(s.embedding, s.features, s.weight)
    np.testing.assert_allclose(reference.stats.vector()[0], scratch.vector()[0], atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(histories(), st.sampled_from(PHOTOS[:3]), st.sampled_from(["delete", "photo-opt-out"]))
def test_adding_then_withdrawing_a_photo_restores_the_state(events, extra, how):
    events = [e for e in events if e[0] == "up" and e[1].photo_id != extra.photo_id]
    before = run_cycles(events, [])
    withdraw = (("delete", PhotoDeleted(event_id="dx", user_id="ana", event_time=T0, photo_id=extra.photo_id))
                if how == "delete" else
                ("toggle", toggle_event("ana", "photo", extra.photo_id, False, T0, event_id="tx")))
    after = run_cycles([*events, ("up", extra), withdraw], [len(events), len(events) + 1])
    assert_same_style(after, before)
    assert after.stats.count == before.stats.count


@settings(max_examples=100, deadline=None)
@given(histories())
def test_duplicates_change_nothing(events):
    once = run_cycles(events, [])
    twice = run_cycles(events + events, [len(events)])
    assert_same_style(twice, once)
    assert twice.version == once.version  # the repeat made no new version


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10_000)), min_size=1, max_size=6, unique_by=lambda t: t[1]),
       st.randoms(use_true_random=False))
def test_latest_toggle_by_event_time_wins_whatever_the_arrival_order(toggles, rnd):
    events = [("toggle", toggle_event("ana", "album", "a", on, T0 + timedelta(minutes=m), event_id=f"t{m}"))
              for on, m in toggles]
    rnd.shuffle(events)
    view = run_cycles([("up", PHOTOS[1]), *events], list(range(1, len(events) + 1)))  # one event per cycle
    latest_enabled = max(toggles, key=lambda t: t[1])[0]
    assert ("p1" in view.stored) == latest_enabled
    assert view.consent["album:a"].enabled == latest_enabled


def test_a_broker_that_lost_processed_messages_is_refused():
    import pytest

    from stylestream.pipelines.ingest import TopicReset, check_not_reset

    check_not_reset({("photo-events", 0): 5}, {("photo-events", 0): 5})
    with pytest.raises(TopicReset, match=r"photo-events\[0\] state at 5, broker ends at 0"):
        check_not_reset({("photo-events", 0): 5}, {("photo-events", 0): 0})


def test_an_explanation_names_the_photos_that_pull_each_feature_most_ties_by_photo_id():
    from stylestream.schemas.tables import FEATURE_NAMES
    from stylestream.transforms.manifest import TOP_PHOTOS, explain
    from stylestream.transforms.style import StoredContribution

    # Five photos of weight 1 whose brightness is 0, 0, 1, 1, 0.5 (mean 0.5): p2 and p3 raise it
    # equally (ties by photo id), p0 and p1 lower it, p4 sits on the mean and pulls nowhere.
    j = FEATURE_NAMES.index("brightness")
    stored = {}
    for i, value in enumerate([0.0, 0.0, 1.0, 1.0, 0.5]):
        features = np.zeros(len(FEATURE_NAMES), np.float32)
        features[j] = value
        stored[f"p{i}"] = StoredContribution(f"a{i % 2}", 1.0, np.eye(8, dtype=np.float32)[i], features, 1, None)
    stats = sum((StyleStats.of(c.embedding, c.features, c.weight) for c in stored.values()),
                StyleStats.zero(8, len(FEATURE_NAMES)))
    got = explain(stored, stats, facets=[])
    brightness = got.features["brightness"]
    assert [(p.photo_id, p.album_id, p.pull) for p in brightness.raises] == [("p2", "a0", 0.1), ("p3", "a1", 0.1)]
    assert [(p.photo_id, p.pull) for p in brightness.lowers] == [("p0", -0.1), ("p1", -0.1)]
    # Every photo pulls the overall embedding toward itself equally: the first TOP_PHOTOS by id.
    assert [p.photo_id for p in got.overall] == [f"p{i}" for i in range(TOP_PHOTOS)]
    assert explain({}, StyleStats.zero(8, len(FEATURE_NAMES)), []).overall == []
