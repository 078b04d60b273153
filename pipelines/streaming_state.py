"""The per-user style state of the streaming pipeline in Beam: `UpdateUserStyle`, a stateful DoFn
whose cells are Beam keyed state (a value cell for the summary, ordered lists keyed by hashes for the
photos and the album index) and whose publish timer is a processing-time timer. What the state holds
and how an event changes it: `pipelines/user_state.py`. Byte counts per event kind are reported as
Beam distribution metrics (namespace `user_state`).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable
from datetime import UTC, datetime

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import OrderedListStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from stylestream.pipelines.user_state import (
    PUBLISH_DELAY_S,
    PhotoEntry,
    UserSummary,
    album_index_changes,
    apply_batch,
    changed_entries,
    event_kind,
    publish_latest,
)
from stylestream.privacy.erasure import subject
from stylestream.schemas.events import StyleBasis
from stylestream.transforms.records import Contribution, Sourced, UserBatch

REINGEST = "reingest"
ERASED = "erased"
REFUSED = "refused"


def _hash(text: str, bits: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> (64 - bits)


def photo_key(photo_id: str) -> int:
    """The photo's sort key in the `photos` list (62 bits; a collision only puts two entries under one key)."""
    return _hash(photo_id, 62)


def album_key(album_id: str, photo_id: str | None = None) -> int:
    """(album, photo)'s sort key in the `albums` list; with no photo, the start of the album's range."""
    return (_hash(album_id, 30) << 32) | (_hash(photo_id, 32) if photo_id is not None else 0)


class OrderedListCells:
    """One user's state cells for one call, with the bytes read and written.

    A photo's entry is replaced by appending its new value under the same key, numbered: reads keep
    the highest number per photo. The older values are cleared when the key is next written in a
    later bundle: Prism 2.77 fails on clearing ordered-list state that its bundle did not start with,
    and a value appended in the current bundle is not there yet (`written`: the keys this bundle
    appended to, with the number their next value gets). The album index holds photo ids; one left
    behind by a deletion in the bundle that indexed it only makes an album toggle read that entry."""

    def __init__(self, user_id: str, summary, photos, albums, written: dict[tuple[str, str, int], int]):
        self._user, self._summary, self._photos, self._albums = user_id, summary, photos, albums
        self._written = written
        self._under: dict[int, dict[str, tuple[int, PhotoEntry]]] = {}  # per read key: photo -> (number, entry)
        self.read = self.written = 0
        self.leftovers = False  # an erasure left values this bundle appended (`clear`)

    def summary(self, empty: UserSummary) -> UserSummary:
        raw = self._summary.read()
        self.read += len(raw or b"")
        return pickle.loads(raw) if raw else empty

    def write_summary(self, summary: UserSummary) -> None:
        raw = pickle.dumps(summary)
        self.written += len(raw)
        self._summary.write(raw)

    def _entries(self, items: Iterable) -> dict[str, PhotoEntry]:
        rows = []
        for key, raw in items:
            self.read += len(raw)
            rows.append((key.micros, int.from_bytes(raw[:4], "big"), raw[4:]))
        hidden: dict[int, int] = {}  # key -> the number of an erasure's empty value: what is before it is gone
        for key, number, payload in rows:
            self._under.setdefault(key, {})
            if not payload:
                hidden[key] = max(hidden.get(key, -1), number)
        out = {}
        for key, number, payload in rows:
            if not payload or number <= hidden.get(key, -1):
                continue
            entry = pickle.loads(payload)
            under = self._under[key]
            if entry.photo_id not in under or number >= under[entry.photo_id][0]:
                under[entry.photo_id] = (number, entry)
                out[entry.photo_id] = entry
        return out

    def entries(self, photo_ids: Iterable[str]) -> dict[str, PhotoEntry]:
        """The entries of these photos (those it has)."""
        wanted, out = set(photo_ids), {}
        for k in {photo_key(p) for p in wanted}:
            out |= self._entries(self._photos.read_range(Timestamp(micros=k), Timestamp(micros=k + 1)))
        return {p: e for p, e in out.items() if p in wanted}

    def _album_ids(self, start: int, stop: int) -> set[str]:
        ids = set()
        for _, raw in self._albums.read_range(Timestamp(micros=start), Timestamp(micros=stop)):
            self.read += len(raw)
            ids.add(raw.decode())
        return ids

    def album_photos(self, album_id: str) -> set[str]:
        start = album_key(album_id)
        return self._album_ids(start, start + (1 << 32))

    def every_entry(self) -> dict[str, PhotoEntry]:
        return self._entries(self._photos.read())

    def clear(self) -> None:
        """Every cell of the user (after `every_entry`, which finds every photo key). Values this bundle
        appended cannot be cleared yet: an empty value numbered after them hides them, and `leftovers`
        asks for a `sweep` in a later bundle."""
        self._summary.clear()
        for key in list(self._under):
            self._drop("photos", self._photos, key)
        for key in {ts.micros for ts, _ in self._albums.read()}:
            self._drop("albums", self._albums, key)

    def _drop(self, name: str, cell, key: int) -> None:
        written = (name, self._user, key)
        if written in self._written:
            self.leftovers = True
            number = self._written[written]
            self._written[written] = number + 1
            cell.add((Timestamp(micros=key), number.to_bytes(4, "big") if name == "photos" else b""))
        else:
            cell.clear_range(Timestamp(micros=key), Timestamp(micros=key + 1))
        if name == "photos":
            self._under.pop(key, None)

    def sweep(self) -> None:
        """Clears the keys whose values an erasure hid in an earlier bundle (see `clear`)."""
        live = self.every_entry()
        for key, under in list(self._under.items()):
            if not under:
                self._drop("photos", self._photos, key)
        stale = {}
        for ts, raw in self._albums.read():
            stale.setdefault(ts.micros, []).append(raw.decode())
        for key, ids in stale.items():
            if not any(p in live for p in ids):
                self._drop("albums", self._albums, key)

    def _replace(self, cell, name: str, key: int, values: list[bytes], existing: bool) -> int:
        """`values` become everything under `key` (or its latest values, until a later bundle);
        `existing`: whether the key holds values already. Returns the number the values get."""
        written = (name, self._user, key)
        if existing and written not in self._written:
            cell.clear_range(Timestamp(micros=key), Timestamp(micros=key + 1))
        number = self._written.get(written, 0)
        self._written[written] = number + 1
        for v in values:
            v = number.to_bytes(4, "big") + v if name == "photos" else v
            self.written += len(v)
            cell.add((Timestamp(micros=key), v))
        return number

    def write_entries(self, before: dict[str, PhotoEntry], after: dict[str, PhotoEntry]) -> None:
        """Rewrites the entries that changed, and the album index of photos that gained or left one."""
        for p, raw in changed_entries(before, after).items():
            k = photo_key(p)
            # Entries of other photos under the same key (a hash collision) stay.
            kept = [pickle.dumps(e) for q, (_, e) in self._under.get(k, {}).items() if q != p]
            self._replace(self._photos, "photos", k, [*kept, raw], existing=k in self._under)
        gained, lost = album_index_changes(before, after)
        for album_id, p in gained:
            self._replace(self._albums, "albums", album_key(album_id, p), [p.encode()], existing=False)
        for album_id, p in lost:
            k = album_key(album_id, p)
            others = self._album_ids(k, k + 1) - {p}  # another photo under the same key stays
            self._replace(self._albums, "albums", k, [q.encode() for q in sorted(others)], existing=True)


class _UpdateUserStyle(beam.DoFn):
    SUMMARY = ReadModifyWriteStateSpec("summary", BytesCoder())
    PHOTOS = OrderedListStateSpec("photos", BytesCoder())
    ALBUMS = OrderedListStateSpec("albums", BytesCoder())
    PUBLISH = TimerSpec("publish", TimeDomain.REAL_TIME)

    def __init__(self, dim: int, n_features: int, basis: StyleBasis, publish_delay_s: float):
        self._dim, self._n_features = dim, n_features
        self._basis, self._delay = basis, publish_delay_s

    def start_bundle(self):
        self._written: dict[tuple[str, str, int], int] = {}

    def _empty(self) -> UserSummary:
        return UserSummary.empty(self._dim, self._n_features)

    def _count(self, kind: str, cells: OrderedListCells) -> None:
        Metrics.distribution("user_state", f"{kind}.bytes_read").update(cells.read)
        Metrics.distribution("user_state", f"{kind}.bytes_written").update(cells.written)

    def process(self, keyed: tuple[str, UserBatch],
                summary_cell=beam.DoFn.StateParam(SUMMARY),  # noqa: B008 (Beam idiom)
                photos_cell=beam.DoFn.StateParam(PHOTOS),  # noqa: B008
                albums_cell=beam.DoFn.StateParam(ALBUMS),  # noqa: B008
                publish=beam.DoFn.TimerParam(PUBLISH)):  # noqa: B008
        subject, batch = keyed
        cells = OrderedListCells(subject, summary_cell, photos_cell, albums_cell, self._written)
        applied = apply_batch(cells, batch, self._empty(), self._basis, datetime.now(UTC))
        if applied.set_timer or cells.leftovers:  # the timer also sweeps what an erasure left
            publish.set(Timestamp.now() + Duration(seconds=self._delay))
        self._count(event_kind(batch), cells)
        for upload in applied.reingest:
            yield beam.pvalue.TaggedOutput(REINGEST, upload)
        for message in applied.erased:
            yield beam.pvalue.TaggedOutput(ERASED, message)
        for letter in applied.dead_letters:
            yield beam.pvalue.TaggedOutput(REFUSED, letter)

    @on_timer(PUBLISH)
    def publish(self, subject=beam.DoFn.KeyParam,
                summary_cell=beam.DoFn.StateParam(SUMMARY),  # noqa: B008
                photos_cell=beam.DoFn.StateParam(PHOTOS),  # noqa: B008
                albums_cell=beam.DoFn.StateParam(ALBUMS)):  # noqa: B008
        cells = OrderedListCells(subject, summary_cell, photos_cell, albums_cell, self._written)
        summary = cells.summary(self._empty())
        if summary.forgotten_at is not None and summary.user_id is None:  # nothing of theirs since
            cells.sweep()
        version = publish_latest(cells, self._empty(), self._basis, datetime.now(UTC))
        self._count("publish", cells)
        if version is not None:
            yield version


def keyed_batch(item: Contribution | Sourced, key: bytes) -> tuple[str, UserBatch]:
    """The item as its user's batch, keyed by the user's erasure subject (see pipelines/user_state.py)."""
    batch = UserBatch.of(item)
    return subject(batch.user_id, key), batch


class UpdateUserStyle(beam.PTransform):
    """Per-user style state in the runner: (contributions, deletes, consent events) -> the users' new
    style versions (`pipelines/plan.NewVersion`, main output `versions`), tagged `reingest` the uploads
    to publish again after an opt-in, tagged `erased` the tombstones of people forgotten, and tagged
    `refused` the dead letters of contributions the state refused.
    `key`: the state's key (analytics/pseudonyms.py), for the erasure subjects the state is keyed by."""

    def __init__(self, dim: int, n_features: int, basis: StyleBasis, key: bytes,
                 publish_delay_s: float = PUBLISH_DELAY_S):
        super().__init__()
        self._fn = _UpdateUserStyle(dim, n_features, basis, publish_delay_s)
        self._key = key

    def expand(self, pcolls):
        return (
            pcolls
            | "OneStream" >> beam.Flatten()
            | "BySubject" >> beam.Map(keyed_batch, self._key).with_output_types(tuple[str, UserBatch])
            | "PerUser" >> beam.ParDo(self._fn).with_outputs(REINGEST, ERASED, REFUSED, main="versions")
        )

