"""The dead-letter contract: what every `<topic>.dlq` message holds, written by ingestion and serving
and read by `stylestream dlq` (and any tool that replays bad input)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from stylestream.streams.topics import dlq


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

    @classmethod
    def of(cls, message, stage: str, reason: str) -> DeadLetter:
        """The dead letter of a raw message (anything with topic, partition, offset, key and value:
        a Kafka record or a `streams.clients.Message`)."""
        return cls(message.topic, message.partition, message.offset, message.key, message.value, stage, reason)

    def message(self) -> tuple[str, bytes, bytes]:
        """(topic, key, value) on the source's dead-letter topic, keyed by user like its source; a
        message without a key gets an empty one (every runner's sink takes it: Flink's needs bytes)."""
        return dlq(self.topic), self.key or b"", self.to_json()

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
