"""Decode and validate raw Kafka messages against their topic's contract."""

from __future__ import annotations

import apache_beam as beam

from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import InvalidEvent, PhotoDeleted, PhotoEmbedded, PhotoUploaded, parse_event
from stylestream.streams.clients import Message
from stylestream.transforms.records import Sourced

UPLOADS, EMBEDDED, DELETES, TOGGLES, DEAD = "uploads", "embedded", "deletes", "toggles", "dead"


def parse_message(msg: Message) -> Sourced | DeadLetter:
    """The typed event of a message, or a dead letter saying why it is not one."""
    try:
        event = parse_event(msg.topic, msg.value or b"")
    except InvalidEvent as e:
        return DeadLetter.of(msg, "validate", str(e))
    # The message key routes a user's events to one partition; a mismatch would break per-user order.
    if msg.key is not None and msg.key != event.user_id.encode():
        return DeadLetter.of(msg, "validate", f"message key {msg.key!r} is not the event's user_id {event.user_id!r}")
    return Sourced(event, msg.topic, msg.partition, msg.offset, msg.value)


def route(parsed: Sourced | DeadLetter) -> str:
    if isinstance(parsed, DeadLetter):
        return DEAD
    if isinstance(parsed.event, PhotoUploaded):
        return UPLOADS
    if isinstance(parsed.event, PhotoEmbedded):
        return EMBEDDED
    if isinstance(parsed.event, PhotoDeleted):
        return DELETES
    return TOGGLES


class _Route(beam.DoFn):
    def process(self, msg: Message):
        parsed = parse_message(msg)
        yield beam.pvalue.TaggedOutput(route(parsed), parsed)


class ParseEvents(beam.PTransform):
    """Messages -> tagged outputs `uploads`, `embedded` (contributions computed on a device),
    `deletes`, `toggles` (Sourced: consent toggles and forget requests) and `dead` (DeadLetter)."""

    def expand(self, messages):
        return messages | beam.ParDo(_Route()).with_outputs(UPLOADS, EMBEDDED, DELETES, TOGGLES, DEAD)
