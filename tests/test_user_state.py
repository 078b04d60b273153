"""The streaming runners' per-user steps (pipelines/user_state.py) over plain in-memory cells: the
forget rule is the local driver's, whatever order the events arrive in, and a device's contribution
naming a photo known with another file is refused."""

from __future__ import annotations

import itertools
import pickle
from datetime import UTC, datetime, timedelta

import numpy as np

from stylestream.demo.synthetic import toggle_event
from stylestream.models.clip import ClipSpec
from stylestream.pipelines.user_state import PhotoEntry, UserSummary, apply_batch, publish_latest
from stylestream.privacy.erasure import STATE_KINDS
from stylestream.schemas.events import (
    DeviceBasis,
    ImageRef,
    PhotoEmbedded,
    PhotoUploaded,
    UserForgotten,
    encode_event,
    parse_event,
)
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.topics import STYLE_VECTORS
from stylestream.transforms.device import device_contribution
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.records import Contribution, Sourced, UserBatch
from stylestream.transforms.style import UserView, plan_user_update

T0 = datetime(2026, 3, 1, tzinfo=UTC)
BASIS = style_basis(ClipSpec(), 365.0, DecodeLimits())
DIM = 8


class DictCells:
    """UserCells in plain dicts (the runners' cells are tested on their runners)."""

    def __init__(self):
        self.state: dict = {"summary": None, "photos": {}, "albums": {}}
        self.read = self.written = 0

    def summary(self, empty: UserSummary) -> UserSummary:
        return self.state["summary"] or empty

    def write_summary(self, summary: UserSummary) -> None:
        self.state["summary"] = summary

    def entries(self, photo_ids) -> dict[str, PhotoEntry]:
        return {p: self.state["photos"][p] for p in photo_ids if p in self.state["photos"]}

    def album_photos(self, album_id: str) -> set[str]:
        return {p for p, e in self.state["photos"].items() if e.album_id == album_id}

    def every_entry(self) -> dict[str, PhotoEntry]:
        return dict(self.state["photos"])

    def write_entries(self, before, after) -> None:
        self.state["photos"].update(after)

    def clear(self) -> None:
        self.state = {"summary": None, "photos": {}, "albums": {}}


def upload(photo_id: str, when: datetime) -> Contribution:
    rng = np.random.default_rng(abs(hash(photo_id)) % 2**32)
    e = rng.normal(size=DIM).astype(np.float32)
    event = PhotoUploaded(event_id=f"up-{photo_id}", user_id="ana", event_time=when, photo_id=photo_id,
                          album_id="a", taken_at=when,
                          image=ImageRef(uri=f"file:///{photo_id}.jpg", sha256="0" * 64, size_bytes=1))
    return Contribution(event, e / np.linalg.norm(e), rng.random(len(FEATURE_NAMES)).astype(np.float32))


def forget(when: datetime, request: str = "forget-1") -> Sourced:
    event = UserForgotten(event_id=request, user_id="ana", event_time=when)
    return Sourced(event, "consent-events", 0, 0, b"")


DEVICE_BASIS = DeviceBasis(model="tiny", weights="sha256:" + "1" * 64, preprocessing="v1")


def from_device(photo_id: str, sha: str, offset: int, album: str = "a") -> Contribution:
    """A device's contribution of `photo_id` (file `sha`), as read at `offset`."""
    e = np.random.default_rng(offset).normal(size=DIM)
    event = PhotoEmbedded(event_id=f"dev-{photo_id}-{sha[0]}", user_id="ana", event_time=T0, photo_id=photo_id,
                          album_id=album, taken_at=T0, sha256=sha, size_bytes=10,
                          embedding=list(e / np.linalg.norm(e)), features=dict.fromkeys(FEATURE_NAMES, 0.5),
                          basis=DEVICE_BASIS)
    return device_contribution(Sourced(event, "photo-events", 0, offset, encode_event(event)), DEVICE_BASIS, DIM,
                               10**6)


def run(items, cells: DictCells | None = None) -> tuple[DictCells, list]:
    cells, erased = cells or DictCells(), []
    for item in items:  # a fresh empty summary each call, as the runners' cells give
        applied = apply_batch(cells, UserBatch.of(item), UserSummary.empty(DIM, len(FEATURE_NAMES)), BASIS, T0)
        erased.extend(applied.erased)
    return cells, erased


def test_a_forget_request_clears_the_cells_whatever_the_order_and_voids_earlier_events():
    before = [upload("p1", T0 - timedelta(days=3)), upload("p2", T0 - timedelta(days=2))]
    request = forget(T0)
    late = upload("p3", T0 - timedelta(days=1))  # taken and sent before the request, arriving after it
    for order in itertools.permutations([*before, request, late]):
        cells, erased = run(order)
        summary = cells.state["summary"]
        assert cells.state["photos"] == {} and summary.stats.count == 0 and summary.forgotten_at == T0
        assert summary.user_id is None  # nothing of theirs but the key and the time
        [tombstone] = [parse_event(STYLE_VECTORS, v) for t, _, v in erased if v is not None and t == STYLE_VECTORS]
        assert tombstone.tombstone and [r.event_id for r in tombstone.erasure.requests] == ["forget-1"]


def test_the_tombstone_counts_what_the_state_held_and_a_repeated_request_counts_for_nothing():
    _, erased = run([upload("p1", T0 - timedelta(days=3)), upload("p2", T0 - timedelta(days=2)),
                     forget(T0), forget(T0, "forget-1")])
    tombstones = [parse_event(STYLE_VECTORS, v) for t, _, v in erased if v is not None and t == STYLE_VECTORS]
    assert len(tombstones) == 1  # the redelivered request is void
    assert tombstones[0].erasure.deleted == {STATE_KINDS["photos"]: 2, STATE_KINDS["contributions"]: 2,
                                             STATE_KINDS["user_stats"]: 1}
    assert tombstones[0].withdrawn_versions == [1, 2]


def test_what_a_person_sends_after_being_forgotten_starts_afresh():
    cells, _ = run([upload("p1", T0 - timedelta(days=3)), forget(T0), upload("p4", T0 + timedelta(days=1))])
    version = publish_latest(cells, UserSummary.empty(DIM, len(FEATURE_NAMES)), BASIS, T0)
    # numbered after the tombstone (version 2, after her version 1): no number names two styles
    assert version.user_id == "ana" and version.version == 3 and version.event.photo_count == 1
    assert [p.photo_id for p in version.manifest.photos] == ["p4"]


def test_a_device_contribution_of_a_photo_known_with_another_file_is_refused_and_changes_nothing():
    # A server upload (file 0...0), a device's photo (a...a), and one switched off with its album (b...b)
    cells, _ = run([upload("p1", T0), from_device("d1", "a" * 64, 1),
                    from_device("d2", "b" * 64, 2, album="off"),
                    Sourced(toggle_event("ana", "album", "off", False, T0), "consent-events", 0, 0, b"")])
    before = pickle.dumps(cells.state)
    for conflict in [from_device("p1", "c" * 64, 3), from_device("d1", "c" * 64, 4),
                     from_device("d2", "c" * 64, 5, album="off")]:  # d2: known from the catalogue only
        applied = apply_batch(cells, UserBatch.of(conflict), UserSummary.empty(DIM, len(FEATURE_NAMES)), BASIS, T0)
        (letter,) = applied.dead_letters
        assert (letter.stage, letter.offset, letter.value) == ("conflict", conflict.source.offset, conflict.source.raw)
        assert f"photo {conflict.photo_id} is known with another file" in letter.reason
        assert not applied.changed and pickle.dumps(cells.state) == before
    # The same file again is no conflict (and counts once)
    applied = apply_batch(cells, UserBatch.of(from_device("d1", "a" * 64, 6)),
                          UserSummary.empty(DIM, len(FEATURE_NAMES)), BASIS, T0)
    assert applied.dead_letters == [] and not applied.changed


def test_within_one_batch_the_first_to_arrive_counts_and_the_other_file_is_refused():
    first, later = from_device("d1", "b" * 64, 7), from_device("d1", "a" * 64, 9)
    update = plan_user_update(UserView.empty(DIM, len(FEATURE_NAMES)), UserBatch("ana", [later, first]), 365.0)
    assert [c.sha256 for c, _ in update.add] == ["b" * 64]
    assert [d.offset for d in update.dead_letters] == [9]
