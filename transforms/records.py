"""The records that flow between the ingestion transforms (plain, picklable dataclasses)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from stylestream.schemas.events import PhotoDeleted, PhotoUploaded, StyleLearningToggled


@dataclass(frozen=True)
class DeadLetter:
    """Input that could not be used, with everything needed to find and replay it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    stage: str  # where it failed: "decode", "validate", "fetch", "image", ...
    reason: str

    def to_json(self) -> bytes:
        return json.dumps({
            "reason": self.reason,
            "stage": self.stage,
            "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
            "key_base64": None if self.key is None else base64.b64encode(self.key).decode(),
            "original_base64": None if self.value is None else base64.b64encode(self.value).decode(),
            "failed_at": datetime.now(UTC).isoformat(),
        }).encode()


PREVIEW_CHARS = 60


def read_dead_letter(value: bytes) -> dict:
    """A dead-letter message (`DeadLetter.to_json`) as a flat record for people and tools, with a
    short preview of the original bytes (text as text, anything else as its size)."""
    d = json.loads(value)
    original = None if d.get("original_base64") is None else base64.b64decode(d["original_base64"])
    if original is None:
        preview = "(no value)"
    elif "\ufffd" not in (text := original.decode("utf-8", "replace")):
        flat = " ".join(text.split())
        preview = flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS - 1] + "…"
    else:
        preview = f"({len(original)} bytes, not text)"
    source = d["source"]
    return {"failed_at": d.get("failed_at"), "source": f"{source['topic']}[{source['partition']}]@{source['offset']}",
            "topic": source["topic"], "partition": source["partition"], "offset": source["offset"],
            "stage": d.get("stage"), "reason": d.get("reason"), "preview": preview,
            "key_base64": d.get("key_base64"), "original_base64": d.get("original_base64")}


@dataclass(frozen=True)
class Sourced:
    """A valid event and the Kafka position it came from."""

    event: PhotoUploaded | PhotoDeleted | StyleLearningToggled
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

    upload: PhotoUploaded  # the event (references only, no pixels): kept to re-ingest after an opt-in
    embedding: np.ndarray  # float32, L2-normalized
    features: np.ndarray  # float32
    metadata: dict[str, float | int | str] = field(default_factory=dict)

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


@dataclass
class UserBatch:
    """One user's share of a cycle: new contributions (embedded uploads), deletions and consent toggles."""

    user_id: str
    contributions: list[Contribution] = field(default_factory=list)
    deletes: list[PhotoDeleted] = field(default_factory=list)
    toggles: list[StyleLearningToggled] = field(default_factory=list)
