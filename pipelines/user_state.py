"""Each user's style state inside a streaming runner, laid out so that an event touches what it changes.

A user's cells (the runner's keyed state; the key is the user id):
- the summary, one value: the sums (`StyleStats`), the version, the consent records (one per scope
  the user ever toggled) and what waits to be published: a few KB, whatever the size of the library.
- the photos: one entry per photo the user ever sent (`PhotoEntry`: its album, its catalogued
  upload for re-ingestion, whether it is deleted, and its stored contribution while it counts).
- the album index: which photos are in which album, so that an album toggle reads that album's
  entries only.

An upload, a deletion or a photo toggle reads and writes the summary and one photo entry; an album
toggle reads its album's entries; only a whole-user toggle reads every entry. The facets need every
contribution, so they are computed when a version is published: the runner calls `publish_latest`
from a processing-time timer that `apply_batch` asks for at the user's first unpublished change, so
a burst of events costs one read of the library, as one cycle of the local driver does.
Intermediate versions are counted but not published (serving only ever wants the latest).

A forget request clears every cell of the user by the local driver's rule (`after_forgets`) and hands
the runner the tombstones to publish; the state is keyed by the user's erasure subject (a keyed hash,
privacy/erasure.subject), so all that stays of a forgotten person is that key and when they were
forgotten, which voids their earlier events arriving late.

The decisions are the local driver's (`plan_user_update`, `apply_update`, `withdrawn_versions`,
`new_version`); `apply_batch` and `publish_latest` are the two steps every runner calls, over cells
that map them onto its own state (Beam: `pipelines/streaming_state.py`; Flink:
`pipelines/flink_job.py`). Values are stored pickled as bytes, so the cells count exactly the bytes
each event reads and writes.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from stylestream.pipelines.plan import Erasure, NewVersion, after_forgets, new_version
from stylestream.privacy.erasure import STATE_KINDS
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import PhotoEmbedded, PhotoUploaded, StyleBasis
from stylestream.transforms.records import UserBatch, catalogued_sha256
from stylestream.transforms.style import (
    ConsentRecord,
    StoredContribution,
    StyleStats,
    UserUpdate,
    UserView,
    apply_update,
    plan_user_update,
    withdrawn_versions,
)

PUBLISH_DELAY_S = 0.5  # a user's new version waits at most this long, so a burst publishes once


@dataclass
class UserSummary:
    """The small cell: what every event of the user reads."""

    stats: StyleStats
    version: int
    consent: dict[str, ConsentRecord] = field(default_factory=dict)  # one record per scope ever toggled
    published: int = 0  # the latest version published
    withdrawn: tuple[int, int] | None = None  # (first, last) version withdrawn since then
    timer_set: bool = False
    # The state is keyed by the user's erasure subject (a keyed hash), so the id lives here; after
    # an erasure the summary keeps only when it was, and their earlier events count for nothing.
    user_id: str | None = None
    forgotten_at: datetime | None = None

    @classmethod
    def empty(cls, embedding_dim: int, n_features: int) -> UserSummary:
        return cls(StyleStats.zero(embedding_dim, n_features), 0)


@dataclass(frozen=True)
class PhotoEntry:
    """What the runner keeps of one photo of the user."""

    photo_id: str
    album_id: str | None
    upload: PhotoUploaded | PhotoEmbedded | None  # the catalogued upload (references only, or a device's
    # contribution whole); None once deleted
    deleted: bool = False
    stored: StoredContribution | None = None  # while the photo counts


# --- the view of the touched entries, and the entries after an update ---------------------------------

def view_of(summary: UserSummary, entries: dict[str, PhotoEntry]) -> UserView:
    """The `UserView` the per-user rule needs, from the summary and the entries the batch touches."""
    return UserView(summary.stats, summary.version, dict(summary.consent),
                    {p: e.stored for p, e in entries.items() if e.stored is not None},
                    {p for p, e in entries.items() if e.deleted},
                    {p: e.album_id for p, e in entries.items() if e.upload is not None and not e.deleted},
                    files={p: sha for p, e in entries.items()
                           if e.upload is not None and (sha := catalogued_sha256(e.upload))})


def entries_after(entries: dict[str, PhotoEntry], update: UserUpdate, after: UserView) -> dict[str, PhotoEntry]:
    """The touched and new photos' entries once `update` is applied (`after`: the view it gives)."""
    uploads = {p: e.upload for p, e in entries.items() if e.upload is not None}
    uploads |= {c.photo_id: c.upload for c in update.catalog}
    albums = {p: e.album_id for p, e in entries.items()} | {c.photo_id: c.album_id for c in update.catalog}
    photos = set(entries) | set(uploads) | set(update.tombstones)
    return {p: PhotoEntry(p, albums.get(p), None if p in after.deleted else uploads.get(p), p in after.deleted,
                          after.stored.get(p)) for p in sorted(photos)}


def changed_entries(before: dict[str, PhotoEntry], after: dict[str, PhotoEntry]) -> dict[str, bytes]:
    """The entries `after` changes, pickled (what the cells write)."""
    out = {}
    for p, entry in after.items():
        raw = pickle.dumps(entry)
        if p not in before or pickle.dumps(before[p]) != raw:
            out[p] = raw
    return out


def album_index_changes(before: dict[str, PhotoEntry], after: dict[str, PhotoEntry],
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(album, photo) pairs the album index gains and loses: a photo is indexed under its album while
    it is catalogued and not deleted."""
    def indexed(e: PhotoEntry | None) -> bool:
        return e is not None and e.album_id is not None and not e.deleted

    gained = [(e.album_id, p) for p, e in after.items() if indexed(e) and not indexed(before.get(p))]
    lost = [(before[p].album_id, p) for p, e in after.items() if indexed(before.get(p)) and not indexed(e)]
    return gained, lost


def event_kind(batch: UserBatch) -> str:
    """upload, delete, toggle-photo, toggle-album or toggle-user: the name its byte counts go under."""
    if batch.toggles:
        return f"toggle-{batch.toggles[0].scope}"
    return "delete" if batch.deletes else "upload"


class UserCells(Protocol):
    """One user's cells in a runner's keyed state, for one call; `read` and `written` count bytes."""

    read: int
    written: int

    def summary(self, empty: UserSummary) -> UserSummary: ...
    def write_summary(self, summary: UserSummary) -> None: ...
    def entries(self, photo_ids: Iterable[str]) -> dict[str, PhotoEntry]: ...
    def album_photos(self, album_id: str) -> set[str]: ...
    def every_entry(self) -> dict[str, PhotoEntry]: ...
    def write_entries(self, before: dict[str, PhotoEntry], after: dict[str, PhotoEntry]) -> None: ...
    def clear(self) -> None: ...  # every cell of the user: the summary, the photos, the album index


@dataclass(frozen=True)
class Applied:
    """What one batch asks of the runner."""

    reingest: list[PhotoUploaded | PhotoEmbedded]  # uploads to publish again: they count again after an opt-in
    changed: bool  # the user's style changed: a publish must follow
    set_timer: bool  # ...and none is pending yet (for runners whose timers replace each other)
    erased: list[tuple[str, bytes, bytes | None]] = field(default_factory=list)  # the tombstones to publish
    dead_letters: list[DeadLetter] = field(default_factory=list)  # contributions refused (`UserUpdate.refused`)


def state_counts(summary: UserSummary, entries: dict[str, PhotoEntry]) -> dict[str, int]:
    """What the user's cells hold, as an erasure receipt counts it (privacy/erasure.STATE_KINDS)."""
    counts = {STATE_KINDS["photos"]: sum(e.upload is not None for e in entries.values()),
              STATE_KINDS["contributions"]: sum(e.stored is not None for e in entries.values()),
              STATE_KINDS["tombstones"]: sum(e.deleted for e in entries.values()),
              STATE_KINDS["consent"]: len(summary.consent),
              STATE_KINDS["user_stats"]: int(summary.version > 0)}
    return {kind: n for kind, n in counts.items() if n}


def forget(cells: UserCells, summary: UserSummary, erasure: Erasure, empty: UserSummary,
           now: datetime) -> tuple[UserSummary, list[tuple[str, bytes, bytes | None]]]:
    """Every cell of the user goes; the summary left remembers only when (its key is a keyed hash).
    Returns it, and the tombstones to publish (with what was deleted)."""
    deleted = state_counts(summary, cells.every_entry())
    cells.clear()
    version = erasure.tombstone_version  # what they send later is numbered after it
    return (replace(empty, version=version, published=version, forgotten_at=erasure.forgotten_at),
            erasure.messages(deleted, now))


def apply_batch(cells: UserCells, batch: UserBatch, empty: UserSummary, basis: StyleBasis,
                now: datetime) -> Applied:
    """One batch (one event, in a streaming runner) applied to one user's cells."""
    # 1. Read the summary; forget requests erase the cells, and an earlier erasure voids what it covers.
    summary = cells.summary(empty)
    batch, erasure = after_forgets(batch, summary.forgotten_at, summary.version)
    erased = []
    if erasure:
        summary, erased = forget(cells, summary, erasure, empty, now)
    if batch.empty:
        if erasure:
            cells.write_summary(summary)
        return Applied([], False, False, erased)
    summary.user_id = batch.user_id
    # 2. Read only the entries the batch can touch.
    photo_ids, album_ids, whole_user = batch.scopes()
    if whole_user:
        entries = cells.every_entry()
    else:
        entries = cells.entries(photo_ids.union(*(cells.album_photos(a) for a in album_ids)))
    # 3. Decide, by the local driver's rule.
    view = view_of(summary, entries)
    update = plan_user_update(view, batch, basis.half_life_days)
    after = apply_update(view, update)
    # 4. Write what changed; a style change waits for the publish timer.
    new_entries = entries_after(entries, update, after)
    cells.write_entries(entries, new_entries)
    summary.stats, summary.version, summary.consent = after.stats, after.version, after.consent
    withdrawn = withdrawn_versions(view, update)
    if withdrawn:
        first = min(withdrawn[0], summary.withdrawn[0]) if summary.withdrawn else withdrawn[0]
        summary.withdrawn = (first, withdrawn[-1])
    set_timer = update.changes_style and not summary.timer_set
    summary.timer_set = summary.timer_set or set_timer
    cells.write_summary(summary)
    # 5. Photos that count again after an opt-in are published anew, to be embedded again.
    return Applied([new_entries[p].upload for p in update.reingest], update.changes_style, set_timer, erased,
                   update.dead_letters)


def publish_latest(cells: UserCells, empty: UserSummary, basis: StyleBasis, now: datetime) -> NewVersion | None:
    """The user's latest version, with its facets, if it is not published yet (the timer's work)."""
    summary = cells.summary(empty)
    summary.timer_set = False
    version = None
    if summary.version > summary.published:
        stored = {p: e.stored for p, e in cells.every_entry().items() if e.stored is not None}
        withdrawn = list(range(summary.withdrawn[0], summary.withdrawn[1] + 1)) if summary.withdrawn else []
        version = new_version(summary.user_id, summary.version, summary.stats, stored, withdrawn, basis, now)
        summary.published, summary.withdrawn = summary.version, None
    cells.write_summary(summary)
    return version
