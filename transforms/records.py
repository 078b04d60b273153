"""The records that flow between the ingestion transforms (plain, picklable dataclasses)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import (
    PhotoDeleted,
    PhotoEmbedded,
    PhotoUploaded,
    StyleLearningToggled,
    UserForgotten,
    is_forget_request,
)


def capture_day(when: datetime) -> datetime:
    """The day a photo was taken, at 00:00 labelled UTC: the precision the style's weighting needs, and
    all that is kept. A naive time (a camera's local time, zone unknown) keeps its local date."""
    day = when.astimezone(UTC) if when.tzinfo is not None else when
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def file_sha256(event: PhotoUploaded) -> str:
    """Of the photo's file as uploaded (what the person holds), whichever rendition is decoded."""
    inline = event.inline_bytes()
    return hashlib.sha256(inline).hexdigest() if inline is not None else event.image.sha256


def kept_upload(event: PhotoUploaded | PhotoEmbedded) -> PhotoUploaded | PhotoEmbedded:
    """An upload as the state keeps and re-publishes it: its capture time reduced to the day (set
    explicitly, so the upload time no longer stands in for it) and no pixels (an inline image is not
    kept: such a photo cannot be re-embedded after an opt-in unless the photo service sends it again).
    A device's contribution is kept whole (it holds no pixels): re-published, it counts again as it was."""
    if isinstance(event, PhotoEmbedded):
        return event.model_copy(update={"taken_at": capture_day(event.taken_at)})
    return event.model_copy(update={"taken_at": capture_day(event.effective_taken_at), "inline_base64": None})


@dataclass(frozen=True)
class Sourced:
    """A valid event and the Kafka position it came from."""

    event: PhotoUploaded | PhotoEmbedded | PhotoDeleted | StyleLearningToggled | UserForgotten
    topic: str
    partition: int
    offset: int
    raw: bytes  # the original message value, for a dead letter if a later stage fails

    def dead(self, stage: str, reason: str) -> DeadLetter:
        return DeadLetter(self.topic, self.partition, self.offset, self.event.user_id.encode(), self.raw,
                          stage, reason)


@dataclass(frozen=True)
class PreparedPhoto:
    """A decoded photo ready for embedding: a small RGB image, its features, whitelisted metadata."""

    source: Sourced
    image: object  # PIL.Image.Image, RGB, at most a few hundred pixels a side; never stored
    features: np.ndarray  # float32, FEATURE_NAMES order
    metadata: dict[str, float | int | str]


@dataclass(frozen=True)
class Contribution:
    """What one photo adds to its user's style: stored until the photo is withdrawn, then deleted."""

    upload: PhotoUploaded | PhotoEmbedded  # the event as kept (`kept_upload`: no pixels): to re-ingest after an opt-in
    embedding: np.ndarray  # float32, L2-normalized
    features: np.ndarray  # float32
    metadata: dict[str, float | int | str] = field(default_factory=dict)
    sha256: str | None = None  # of the photo's file as uploaded (`file_sha256`), for its style manifest
    offset: int = -1  # of its message (one person's events share a partition: the order they were published)
    source: Sourced | None = None  # a device's message (no pixels in it), for a dead letter if the state refuses it

    @property
    def user_id(self) -> str:
        return self.upload.user_id

    @property
    def photo_id(self) -> str:
        return self.upload.photo_id

    @property
    def album_id(self) -> str | None:
        return self.upload.album_id

    @property
    def taken_at(self) -> datetime:
        return self.upload.effective_taken_at

    @property
    def on_device(self) -> bool:
        """Computed on the person's device (the photo never reached the server)."""
        return isinstance(self.upload, PhotoEmbedded)

    @property
    def arrival(self) -> tuple[str, int, str]:
        """Its place among its person's contributions of one photo: by offset (one person's events share
        a partition, so within a batch this is the order they were published in), then by event id."""
        return (self.photo_id, self.offset, self.upload.event_id)

    def refused(self, reason: str) -> DeadLetter:
        """Its dead letter, when the state refuses it (only a device's contribution is refused)."""
        if self.source is None:
            raise ValueError(f"contribution {self.upload.event_id} has no source message to dead-letter")
        return self.source.dead("conflict", reason)


def catalogued_sha256(upload: PhotoUploaded | PhotoEmbedded) -> str | None:
    """The sha256 of a catalogued photo's file, where its event names one (the store reads the same
    fields from its JSON: pipelines/store.py)."""
    if isinstance(upload, PhotoEmbedded):
        return upload.sha256
    return upload.image.sha256 if upload.image is not None else None


@dataclass
class UserBatch:
    """One user's share of a cycle: new contributions (embedded uploads), deletions, consent toggles
    and, if they asked to be forgotten, those requests (they erase the rest of the batch with them)."""

    user_id: str
    contributions: list[Contribution] = field(default_factory=list)
    deletes: list[PhotoDeleted] = field(default_factory=list)
    toggles: list[StyleLearningToggled] = field(default_factory=list)
    forgets: list[UserForgotten] = field(default_factory=list)

    @classmethod
    def of(cls, item: Contribution | Sourced) -> UserBatch:
        """One embedded upload, deletion or toggle as its user's batch (a streaming runner's unit)."""
        if isinstance(item, Contribution):
            return cls(item.user_id, contributions=[item])
        if isinstance(item.event, PhotoDeleted):
            return cls(item.event.user_id, deletes=[item.event])
        if is_forget_request(item.event):
            return cls(item.event.user_id, forgets=[item.event])
        return cls(item.event.user_id, toggles=[item.event])

    def after(self, when: datetime) -> UserBatch:
        """The events of the batch later than `when` (what follows an erasure at that time)."""
        return UserBatch(self.user_id, [c for c in self.contributions if c.upload.event_time > when],
                         [d for d in self.deletes if d.event_time > when],
                         [t for t in self.toggles if t.event_time > when],
                         [f for f in self.forgets if f.event_time > when])

    @property
    def empty(self) -> bool:
        return not (self.contributions or self.deletes or self.toggles or self.forgets)

    def scopes(self) -> tuple[set[str], set[str], bool]:
        """(photo ids, album ids, whole user?) whose stored state the batch may touch."""
        photos = {c.photo_id for c in self.contributions} | {d.photo_id for d in self.deletes}
        albums = set()
        whole_user = False
        for t in self.toggles:
            if t.scope == "photo":
                photos.add(t.scope_id)
            elif t.scope == "album":
                albums.add(t.scope_id)
            else:
                whole_user = True
        return photos, albums, whole_user
