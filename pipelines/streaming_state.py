"""Each user's style state inside a streaming runner, laid out so that an event touches what it changes.

A user's cells (Beam keyed state; the key is the user id):
- `summary`, one value: the sums (`StyleStats`), the version, the consent records and what waits to
  be published. A few KB, whatever the size of the user's library.
- `photos`, an ordered list keyed by a hash of the photo id: one entry per photo the user ever sent
  (`PhotoEntry`: its album, its catalogued upload for re-ingestion, whether it is deleted, and its
  stored contribution while it counts).
- `albums`, an ordered list keyed by (album hash, photo hash): which photos are in which album, so
  that an album toggle reads that album's entries only.

An upload, a deletion or a photo toggle reads and writes the summary and one photo entry; an album
toggle reads its album's entries; only a whole-user toggle reads every entry. The facets need every
contribution, so they are computed when a version is published: a processing-time timer publishes
the user's latest version `publish_delay_s` after its first unpublished change, and a burst of events
costs one read of the library, as one cycle of the local driver does. Intermediate versions are
counted but not published (serving only ever wants the latest).

The decisions are the local driver's (`plan_user_update`, `apply_update`, `withdrawn_versions`,
`new_version`); this module only maps them onto the runner's cells. Values are stored pickled as
bytes, so the bytes each event reads and writes are exact; they are reported as Beam metrics
(namespace `user_state`, per event kind).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import OrderedListStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from stylestream.pipelines.plan import new_version
from stylestream.schemas.events import PhotoUploaded
from stylestream.transforms.records import UserBatch
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

REINGEST = "reingest"
PUBLISH_DELAY_S = 0.5  # a user's new version waits at most this long, so a burst publishes once


@dataclass
class UserSummary:
    """The small cell: what every event of the user reads."""

    stats: StyleStats
    version: int
    consent: dict[str, ConsentRecord] = field(default_factory=dict)
    published: int = 0  # the latest version published
    withdrawn: tuple[int, int] | None = None  # (first, last) version withdrawn since then
    timer_set: bool = False


@dataclass(frozen=True)
class PhotoEntry:
    """What the runner keeps of one photo of the user."""

    photo_id: str
    album_id: str | None
    upload: PhotoUploaded | None  # the catalogued upload (references only); None once deleted
    deleted: bool = False
    stored: StoredContribution | None = None  # while the photo counts


# --- pure: the cells' keys, and the view of the touched entries --------------------------------------

def _hash(text: str, bits: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> (64 - bits)


def photo_key(photo_id: str) -> int:
    """The photo's sort key in `photos` (62 bits; a collision only puts two entries under one key)."""
    return _hash(photo_id, 62)


def album_key(album_id: str, photo_id: str | None = None) -> int:
    """(album, photo)'s sort key in `albums`; with no photo, the start of the album's range."""
    return (_hash(album_id, 30) << 32) | (_hash(photo_id, 32) if photo_id is not None else 0)


def view_of(summary: UserSummary, entries: dict[str, PhotoEntry]) -> UserView:
    """The `UserView` the per-user rule needs, from the summary and the entries the batch touches."""
    return UserView(summary.stats, summary.version, dict(summary.consent),
                    {p: e.stored for p, e in entries.items() if e.stored is not None},
                    {p for p, e in entries.items() if e.deleted},
                    {p: e.album_id for p, e in entries.items() if e.upload is not None and not e.deleted})


def entries_after(entries: dict[str, PhotoEntry], update: UserUpdate, after: UserView) -> dict[str, PhotoEntry]:
    """The touched and new photos' entries once `update` is applied (`after`: the view it gives)."""
    uploads = {p: e.upload for p, e in entries.items() if e.upload is not None}
    uploads |= {c.photo_id: c.upload for c in update.catalog}
    albums = {p: e.album_id for p, e in entries.items()} | {c.photo_id: c.album_id for c in update.catalog}
    photos = set(entries) | set(uploads) | set(update.tombstones)
    return {p: PhotoEntry(p, albums.get(p), None if p in after.deleted else uploads.get(p), p in after.deleted,
                          after.stored.get(p)) for p in sorted(photos)}


def event_kind(batch: UserBatch) -> str:
    """upload, delete, toggle-photo, toggle-album or toggle-user: the name its byte counts go under."""
    if batch.toggles:
        return f"toggle-{batch.toggles[0].scope}"
    return "delete" if batch.deletes else "upload"


# --- the runner's cells ----------------------------------------------------------------------------------

class _Cells:
    """One user's state cells for one call, with the bytes read and written.

    An entry is replaced by appending its new value under the same key: reads keep the last value per
    photo. The older values are cleared when the key is next written in a later bundle: Prism 2.77
    fails on clearing ordered-list state that its bundle did not start with, and a value appended
    in the current bundle is not there yet (`written`: the keys this bundle appended to)."""

    def __init__(self, user_id: str, summary, photos, albums, written: set[tuple[str, str, int]]):
        self._user, self._summary, self._photos, self._albums = user_id, summary, photos, albums
        self._written = written
        self._under: dict[int, dict[str, PhotoEntry]] = {}  # the latest entry per photo under each read key
        self.read = self.written = 0

    def summary(self, empty: UserSummary) -> UserSummary:
        raw = self._summary.read()
        self.read += len(raw or b"")
        return pickle.loads(raw) if raw else empty

    def write_summary(self, summary: UserSummary) -> None:
        raw = pickle.dumps(summary)
        self.written += len(raw)
        self._summary.write(raw)

    def _entries(self, items: Iterable) -> dict[str, PhotoEntry]:
        out = {}
        for key, raw in items:  # in key order, and in append order within a key: the last value wins
            self.read += len(raw)
            entry = pickle.loads(raw)
            out[entry.photo_id] = self._under.setdefault(key.micros, {})[entry.photo_id] = entry
        return out

    def entries(self, photo_ids: Iterable[str]) -> dict[str, PhotoEntry]:
        """The entries of these photos (those it has)."""
        wanted, out = set(photo_ids), {}
        for k in {photo_key(p) for p in wanted}:
            out |= self._entries(self._photos.read_range(Timestamp(micros=k), Timestamp(micros=k + 1)))
        return {p: e for p, e in out.items() if p in wanted}

    def album_photos(self, album_id: str) -> set[str]:
        start = album_key(album_id)
        items = self._albums.read_range(Timestamp(micros=start), Timestamp(micros=start + (1 << 32)))
        ids = set()
        for _, raw in items:
            self.read += len(raw)
            ids.add(raw.decode())
        return ids

    def every_entry(self) -> dict[str, PhotoEntry]:
        return self._entries(self._photos.read())

    def _replace(self, cell, name: str, key: int, values: list[bytes], existing: bool) -> None:
        """`values` become everything under `key` (or its latest values, until a later bundle);
        `existing`: whether the key holds values already."""
        if existing and (name, self._user, key) not in self._written:
            cell.clear_range(Timestamp(micros=key), Timestamp(micros=key + 1))
        self._written.add((name, self._user, key))
        for v in values:
            self.written += len(v)
            cell.add((Timestamp(micros=key), v))

    def write_entries(self, before: dict[str, PhotoEntry], after: dict[str, PhotoEntry]) -> None:
        """Rewrites the entries that changed (and the album index of photos that gained or left one)."""
        for p, entry in after.items():
            raw = pickle.dumps(entry)
            old = before.get(p)
            if old is not None and pickle.dumps(old) == raw:
                continue
            k = photo_key(p)
            # Entries of other photos under the same key (a hash collision) stay.
            kept = [pickle.dumps(e) for q, e in self._under.get(k, {}).items() if q != p]
            self._replace(self._photos, "photos", k, [*kept, raw], existing=bool(self._under.get(k)))
            indexed = old is not None and old.album_id is not None and not old.deleted
            if entry.album_id is not None and not entry.deleted and not indexed:
                self._replace(self._albums, "albums", album_key(entry.album_id, p), [p.encode()], existing=False)
            elif indexed and entry.deleted:
                self._replace(self._albums, "albums", album_key(old.album_id, p), [], existing=True)


class _UpdateUserStyle(beam.DoFn):
    SUMMARY = ReadModifyWriteStateSpec("summary", BytesCoder())
    PHOTOS = OrderedListStateSpec("photos", BytesCoder())
    ALBUMS = OrderedListStateSpec("albums", BytesCoder())
    PUBLISH = TimerSpec("publish", TimeDomain.REAL_TIME)

    def __init__(self, dim: int, n_features: int, half_life_days: float, publish_delay_s: float):
        self._dim, self._n_features = dim, n_features
        self._half_life, self._delay = half_life_days, publish_delay_s

    def start_bundle(self):
        self._written: set[tuple[str, str, int]] = set()

    def _empty(self) -> UserSummary:
        return UserSummary(StyleStats.zero(self._dim, self._n_features), 0)

    def _count(self, kind: str, cells: _Cells) -> None:
        Metrics.distribution("user_state", f"{kind}.bytes_read").update(cells.read)
        Metrics.distribution("user_state", f"{kind}.bytes_written").update(cells.written)

    def process(self, keyed: tuple[str, UserBatch],
                summary_cell=beam.DoFn.StateParam(SUMMARY),  # noqa: B008 (Beam idiom)
                photos_cell=beam.DoFn.StateParam(PHOTOS),  # noqa: B008
                albums_cell=beam.DoFn.StateParam(ALBUMS),  # noqa: B008
                publish=beam.DoFn.TimerParam(PUBLISH)):  # noqa: B008
        user_id, batch = keyed
        cells = _Cells(user_id, summary_cell, photos_cell, albums_cell, self._written)
        # 1. Read the summary and only the entries the batch can touch.
        summary = cells.summary(self._empty())
        photo_ids, album_ids, whole_user = batch.scopes()
        if whole_user:
            entries = cells.every_entry()
        else:
            entries = cells.entries(photo_ids.union(*(cells.album_photos(a) for a in album_ids)))
        # 2. Decide, by the local driver's rule.
        view = view_of(summary, entries)
        update = plan_user_update(view, batch, self._half_life)
        after = apply_update(view, update)
        # 3. Write what changed; a style change waits for the publish timer.
        new_entries = entries_after(entries, update, after)
        cells.write_entries(entries, new_entries)
        summary.stats, summary.version, summary.consent = after.stats, after.version, after.consent
        withdrawn = withdrawn_versions(view, update)
        if withdrawn:
            first = min(withdrawn[0], summary.withdrawn[0]) if summary.withdrawn else withdrawn[0]
            summary.withdrawn = (first, withdrawn[-1])
        if update.changes_style and not summary.timer_set:
            publish.set(Timestamp.now() + Duration(seconds=self._delay))
            summary.timer_set = True
        cells.write_summary(summary)
        self._count(event_kind(batch), cells)
        # 4. Photos that count again after an opt-in are published anew, to be embedded again.
        for p in update.reingest:
            yield beam.pvalue.TaggedOutput(REINGEST, new_entries[p].upload)

    @on_timer(PUBLISH)
    def publish(self, user_id=beam.DoFn.KeyParam,
                summary_cell=beam.DoFn.StateParam(SUMMARY),  # noqa: B008
                photos_cell=beam.DoFn.StateParam(PHOTOS),  # noqa: B008
                albums_cell=beam.DoFn.StateParam(ALBUMS)):  # noqa: B008
        cells = _Cells(user_id, summary_cell, photos_cell, albums_cell, self._written)
        summary = cells.summary(self._empty())
        summary.timer_set = False
        if summary.version > summary.published:
            stored = {p: e.stored for p, e in cells.every_entry().items() if e.stored is not None}
            withdrawn = list(range(summary.withdrawn[0], summary.withdrawn[1] + 1)) if summary.withdrawn else []
            yield new_version(user_id, summary.version, summary.stats, stored, withdrawn, datetime.now(UTC))
            summary.published, summary.withdrawn = summary.version, None
        cells.write_summary(summary)
        self._count("publish", cells)


class UpdateUserStyle(beam.PTransform):
    """Per-user style state in the runner: (contributions, deletes, toggles) -> the users' new style
    versions (`pipelines/plan.NewVersion`, main output `versions`) and, tagged `reingest`, uploads to
    publish again after an opt-in."""

    def __init__(self, dim: int, n_features: int, half_life_days: float, publish_delay_s: float = PUBLISH_DELAY_S):
        super().__init__()
        self._fn = _UpdateUserStyle(dim, n_features, half_life_days, publish_delay_s)

    def expand(self, pcolls):
        contributions, deletes, toggles = pcolls
        keyed = tuple[str, UserBatch]  # a str key: Beam's deterministic coder for keyed state
        return (
            (contributions | "UploadBatch" >> beam.Map(
                lambda c: (c.user_id, UserBatch(c.user_id, contributions=[c]))).with_output_types(keyed),
             deletes | "DeleteBatch" >> beam.Map(
                 lambda s: (s.event.user_id, UserBatch(s.event.user_id, deletes=[s.event]))).with_output_types(keyed),
             toggles | "ToggleBatch" >> beam.Map(
                 lambda s: (s.event.user_id, UserBatch(s.event.user_id, toggles=[s.event]))).with_output_types(keyed))
            | "OneStream" >> beam.Flatten()
            | "PerUser" >> beam.ParDo(self._fn).with_outputs(REINGEST, main="versions")
        )

