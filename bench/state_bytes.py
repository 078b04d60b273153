#!/usr/bin/env python
"""Bytes of runner state each event reads and writes, for a user with many photos.

Drives the streaming pipeline's per-user step (`pipelines/streaming_state._UpdateUserStyle`, its
process and publish-timer methods as the runner calls them) over in-memory state cells with the
semantics of Beam's state API (a value cell and ordered lists with range reads and clears): a user
gets --photos uploads in 3 albums, a version is published, then one event of each kind arrives (an
upload, a deletion, a photo opt-out, an album opt-out, a whole-user opt-out), each in a bundle of its
own. The step itself counts the bytes it reads and writes; a runner stores what it is given, so the
counts are the same on any Beam runner. (The Flink job keeps each album's photo ids in one value, so
there an upload also rewrites its album's id list, about 10 bytes per photo of the album.) Prism
runs this step in the tests; here the order of the events must be exact, which a runner does not
promise across a shuffle.

The earlier layout kept each user's state as one pickled cell (every stored contribution and every
catalogued upload), read and written whole by every event; its size is computed here for the same
user, as `before`. Final line: JSON with per-kind bytes before and after, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from datetime import UTC, datetime, timedelta

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from apache_beam.utils.timestamp import Timestamp
from tqdm import tqdm

from stylestream.defaults import HALF_LIFE_DAYS
from stylestream.demo.synthetic import toggle_event
from stylestream.models.clip import ClipSpec
from stylestream.pipelines.streaming_state import _UpdateUserStyle
from stylestream.schemas.events import ImageRef, PhotoDeleted, PhotoUploaded
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.records import Contribution, UserBatch
from stylestream.transforms.style import StoredContribution, StyleStats, UserView, photo_weight

USER = "u0001"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def contribution(i: int, dim: int, rng: np.random.Generator) -> Contribution:
    e = rng.normal(size=dim).astype(np.float32)
    upload = PhotoUploaded(event_id=f"up-{i}", user_id=USER, event_time=T0, photo_id=f"p{i:05d}",
                           album_id=f"a{i % 3}", taken_at=T0 + timedelta(hours=i),
                           image=ImageRef(uri=f"s3://photos/{USER}/p{i:05d}.jpg", sha256="0" * 64, size_bytes=1))
    return Contribution(upload, e / np.linalg.norm(e), rng.random(len(FEATURE_NAMES)).astype(np.float32))


class ValueCell:
    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value


class OrderedListCell:
    """Values sorted by an integer key; equal keys keep their order of appending."""

    def __init__(self):
        self.items: list[tuple[int, bytes]] = []

    def read(self):
        return self.read_range(Timestamp(micros=-(1 << 63)), Timestamp(micros=(1 << 63) - 1))

    def read_range(self, start: Timestamp, stop: Timestamp):
        return [(Timestamp(micros=k), v) for k, v in self.items if start.micros <= k < stop.micros]

    def add(self, item):
        self.items.append((item[0].micros, item[1]))
        self.items.sort(key=lambda kv: kv[0])

    def clear_range(self, start: Timestamp, stop: Timestamp):
        self.items = [(k, v) for k, v in self.items if not start.micros <= k < stop.micros]


class Timer:
    def set(self, when):
        pass


def earlier_layout_bytes(contributions: list[Contribution], dim: int) -> int:
    """The earlier single cell for this user: (UserView with every contribution, uploads by photo)."""
    stored = {c.photo_id: StoredContribution(c.album_id, photo_weight(c.taken_at, HALF_LIFE_DAYS), c.embedding,
                                             c.features, 1, c.sha256) for c in contributions}
    view = UserView(StyleStats.zero(dim, len(FEATURE_NAMES)), len(contributions), {}, stored, set(),
                    {c.photo_id: c.album_id for c in contributions})
    return len(pickle.dumps((view, {c.photo_id: c.upload for c in contributions})))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=512, help="embedding size (512: ViT-B-32)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    library = [contribution(i, a.dim, rng) for i in range(a.photos)]
    late = contribution(a.photos, a.dim, rng)
    when = T0 + timedelta(days=1)
    one_of_each = {
        "upload": UserBatch(USER, contributions=[late]),
        "delete": UserBatch(USER, deletes=[PhotoDeleted(event_id="del", user_id=USER, event_time=when,
                                                        photo_id="p00001")]),
        "toggle-photo": UserBatch(USER, toggles=[toggle_event(USER, "photo", "p00002", False, when)]),
        "toggle-album": UserBatch(USER, toggles=[toggle_event(USER, "album", "a1", False, when)]),
        "toggle-user": UserBatch(USER, toggles=[toggle_event(USER, "user", None, False, when)]),
    }
    fn = _UpdateUserStyle(a.dim, len(FEATURE_NAMES), style_basis(ClipSpec(), HALF_LIFE_DAYS, DecodeLimits()), 0.5)
    cells = {"summary_cell": ValueCell(), "photos_cell": OrderedListCell(), "albums_cell": OrderedListCell()}
    counted: dict[str, list[int]] = {}
    fn._count = lambda kind, c: counted.setdefault(kind, []).append((c.read, c.written))

    def run(batch: UserBatch) -> None:
        fn.start_bundle()
        list(fn.process((USER, batch), publish=Timer(), **cells))

    def publish() -> None:
        fn.start_bundle()
        list(fn.publish(subject=USER, **cells))

    # 1. The library, a version published, then one event of each kind, each after the last.
    for c in tqdm(library, desc="library", unit="photo"):
        run(UserBatch(USER, contributions=[c]))
    publish()
    library_counts, counted = counted, {}
    for batch in one_of_each.values():
        run(batch)
    publish()

    # 2. The counts, per event kind.
    after = {kind: {"events": len(v), "bytes_read": round(sum(r for r, _ in v) / len(v)),
                    "bytes_written": round(sum(w for _, w in v) / len(v))} for kind, v in counted.items()}
    after["first publish"] = {"events": 1, "bytes_read": library_counts["publish"][0][0],
                              "bytes_written": library_counts["publish"][0][1]}
    before = earlier_layout_bytes(library, a.dim)
    rows = []
    print(f"user with {a.photos} photos, {a.dim}-d embeddings; earlier layout: {before:,} bytes read and written "
          f"by every event")
    print(f"{'event':<14}{'read after':>14}{'written after':>16}{'before/after (read+written)':>30}")
    for kind in ("upload", "delete", "toggle-photo", "toggle-album", "toggle-user", "first publish"):
        got = after.get(kind)
        if got is None:
            continue
        ratio = 2 * before / max(got["bytes_read"] + got["bytes_written"], 1)
        rows.append({"event": kind, "events": got["events"], "read_after": got["bytes_read"],
                     "written_after": got["bytes_written"], "read_before": before, "written_before": before,
                     "ratio": round(ratio, 1)})
        print(f"{kind:<14}{got['bytes_read']:>14,}{got['bytes_written']:>16,}{ratio:>29.1f}x")
    print(json.dumps({"bench": "state_bytes", "photos": a.photos, "dim": a.dim, "per_event": rows}))


if __name__ == "__main__":
    main()
