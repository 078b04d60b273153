"""Backfill: bring an existing photo library in through the same path as live uploads.

A folder (searched recursively) or a manifest (JSON lines: `{"path": ..., "album_id": ...,
"taken_at": ...}`, paths relative to the manifest) becomes `photo_uploaded` events on photo-events,
which ingestion then processes with its usual exactly-once bookkeeping. Photo and event ids derive
from the user and the file's place in the library, so a repeated backfill counts nothing twice;
a progress file makes an interrupted one resume where it stopped instead of publishing again.

Events keep only what the style needs: photos are referenced as library://<id>/<path inside the
library> (the library's folder is registered in the state, never sent), and the capture time is
the day it was taken, flagged when the camera did not record its time zone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from stylestream.analytics import pseudonyms
from stylestream.pipelines.forgetting import LIBRARIES_FILE, backfill_folder, backfilled_libraries
from stylestream.pipelines.layout import StateLayout
from stylestream.pipelines.library import library_uri, manifest_rows, photo_files, register_library
from stylestream.privacy import erasure
from stylestream.schemas.events import ImageRef, PhotoUploaded, encode_event
from stylestream.streams import clients
from stylestream.streams.topics import PHOTO_EVENTS
from stylestream.transforms.records import capture_day

DATETIME_ORIGINAL, OFFSET_TIME_ORIGINAL, EXIF_IFD = 0x9003, 0x9011, 0x8769


@dataclass(frozen=True)
class LibraryItem:
    path: Path
    key: str  # the file's place in the library (relative path): the basis of its ids
    root: Path  # the library's folder: events reference the file relative to it
    album_id: str | None = None
    taken_at: datetime | None = None  # naive: a local time of unknown zone


def scan(source: Path) -> list[LibraryItem]:
    """The photos of a folder or a manifest file, in a stable order."""
    if source.is_dir():
        return [LibraryItem(p, p.relative_to(source).as_posix(), source.absolute(),
                            album_id=_album_of(p.relative_to(source))) for p in photo_files(source)]
    rows = manifest_rows(source, '{"path": ..., "album_id"?: ..., "taken_at"?: ...}')
    root = Path(os.path.commonpath([p.parent for p, _ in rows])) if rows else source.parent.resolve()
    if root == Path(root.anchor):  # events would carry whole local paths
        raise ValueError(f"{source}: its photos share no folder below {root}; keep a library under one folder")
    items = []
    for path, row in rows:
        try:
            taken = datetime.fromisoformat(row["taken_at"]) if row.get("taken_at") else None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {row['path']}: taken_at: {e}") from None
        items.append(LibraryItem(path, row["path"], root, row.get("album_id"), taken))
    return items


def _album_of(relative: Path) -> str | None:
    """A photo's first folder below the library root is its album."""
    return _safe_id(relative.parts[0]) if len(relative.parts) > 1 else None


def _safe_id(text: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text)
    return cleaned[:120] or "album"


def taken_at(path: Path) -> datetime:
    """EXIF DateTimeOriginal (with OffsetTimeOriginal, if the camera wrote one; naive if not: a local
    time of unknown zone), else the file's modification time (UTC)."""
    try:
        with Image.open(path) as im:
            exif = im.getexif().get_ifd(EXIF_IFD)
        raw, offset = exif.get(DATETIME_ORIGINAL), exif.get(OFFSET_TIME_ORIGINAL)
        if isinstance(raw, str):
            local = datetime.strptime(raw.strip()[:19], "%Y:%m:%d %H:%M:%S")
            if isinstance(offset, str) and offset.strip():
                return datetime.fromisoformat(local.isoformat() + offset.strip())
            return local
    except (OSError, ValueError, SyntaxError):
        pass  # not readable as an image here: ingestion gives it a dead-letter reason
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def library_photo_id(user_id: str, key: str) -> str:
    """A library photo's id, from its person and its place in the library: the same whether the library
    is backfilled to the server or synced from the person's device."""
    return "bf-" + hashlib.sha256(f"{user_id}\0{key}".encode()).hexdigest()[:24]


def upload_event(item: LibraryItem, user_id: str, library_id: str) -> PhotoUploaded:
    data = item.path.read_bytes()
    photo_id = library_photo_id(user_id, item.key)
    when = item.taken_at or taken_at(item.path)
    day, zone_known = capture_day(when), when.tzinfo is not None
    return PhotoUploaded(
        # sent now: a person forgotten before may bring their library back
        event_id=f"backfill:{photo_id}", user_id=user_id, event_time=datetime.now(UTC), photo_id=photo_id,
        album_id=item.album_id, taken_at=day, taken_at_zone_known=zone_known,
        image=ImageRef(uri=library_uri(library_id, os.path.relpath(item.path.absolute(), item.root)),
                       sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))


class Progress:
    """How many items of one (user, source) backfill are published, kept in a small JSON file named by
    the user's erasure subject (so forgetting them deletes it: a later backfill starts over)."""

    def __init__(self, state_dir: Path, user_id: str, source: Path):
        self._state = StateLayout(state_dir)
        self._subject = erasure.subject(user_id, pseudonyms.load_or_create_key(state_dir))
        digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
        self.path = backfill_folder(self._state, self._subject) / f"{digest}.json"

    def published(self) -> int:
        return json.loads(self.path.read_text())["published"] if self.path.exists() else 0

    def record_libraries(self, library_ids: set[str]) -> None:
        """The libraries this person's backfills registered (forgetting them removes the registrations)."""
        known = backfilled_libraries(self._state, self._subject)
        if not library_ids <= known:
            path = self.path.with_name(LIBRARIES_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sorted(known | library_ids)))
            tmp.replace(path)

    def save(self, published: int, total: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"published": published, "total": total}))
        tmp.replace(self.path)


def publish(bootstrap_servers: str, items: list[LibraryItem], user_id: str, progress: Progress, registry: Path,
            on_item: Callable[[int], None] | None = None, checkpoint_every: int = 100) -> int:
    """Publish the items not published yet, their libraries registered in `registry`; returns how
    many this call published."""
    library_ids = {root: register_library(registry, root) for root in sorted({i.root for i in items})}
    progress.record_libraries(set(library_ids.values()))
    start = progress.published()
    producer = clients.producer(bootstrap_servers)
    try:
        done, sent = start, []
        for done, item in enumerate(items[start:], start=start + 1):
            event = upload_event(item, user_id, library_ids[item.root])
            sent.append(producer.send(PHOTO_EVENTS, key=user_id.encode(), value=encode_event(event)))
            if done % checkpoint_every == 0:
                clients.acknowledged(producer, sent)  # only what the broker has is marked published
                sent = []
                progress.save(done, len(items))
            if on_item:
                on_item(done)
        clients.acknowledged(producer, sent)
        progress.save(done, len(items))
    finally:
        producer.close()
    return done - start

