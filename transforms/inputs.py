"""Kafka messages -> what the per-user update takes: one composite for the local driver and the
streaming pipeline alike, so both parse, fetch, decode, strip and embed the same way; and the same
steps for one message at a time (`style_input`), for the Flink job."""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam
import numpy as np

from stylestream.models.clip import ClipSpec
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import PhotoEmbedded, PhotoUploaded
from stylestream.streams.clients import Message
from stylestream.transforms.device import DeviceChecks
from stylestream.transforms.embed import EmbedPhotos, to_contribution
from stylestream.transforms.images import DecodeLimits, PhotoError, PreparePhotos, prepare_photo
from stylestream.transforms.parse import ParseEvents, parse_message
from stylestream.transforms.records import Contribution, PreparedPhoto, Sourced


class StyleInputs(beam.PTransform):
    """messages -> {"contributions": embedded uploads and devices' contributions, "deletes": Sourced
    deletions, "toggles": Sourced consent events (toggles and forget requests), "dead": dead letters
    of every stage}."""

    def __init__(self, clip: ClipSpec, limits: DecodeLimits | None = None):
        super().__init__()
        self._clip, self._limits = clip, limits or DecodeLimits()

    def expand(self, messages):
        events = messages | "DecodeValidate" >> ParseEvents()
        photos = events.uploads | "FetchDecodeStripPII" >> PreparePhotos(self._limits)
        embedded = photos.ok | "Embed" >> EmbedPhotos(self._clip)
        device = (events.embedded | "CheckDeviceBasis" >> beam.Map(DeviceChecks(self._clip, self._limits))
                  | "SplitDeviceDead" >> beam.Partition(lambda item, _n: int(isinstance(item, DeadLetter)), 2))
        contributions = (embedded, device[0]) | "Contributions" >> beam.Flatten()
        dead = (events.dead, photos.dead, device[1]) | "DeadLetters" >> beam.Flatten()
        return {"contributions": contributions, "deletes": events.deletes, "toggles": events.toggles, "dead": dead}


def style_input(msg: Message, limits: DecodeLimits, embed: Callable[[PreparedPhoto], np.ndarray],
                device: DeviceChecks) -> Contribution | Sourced | DeadLetter:
    """One message through StyleInputs' steps: an embedded upload or a device's contribution, a
    deletion or toggle, or a dead letter."""
    parsed = parse_message(msg)
    if not isinstance(parsed, DeadLetter) and isinstance(parsed.event, PhotoEmbedded):
        return device(parsed)
    if isinstance(parsed, DeadLetter) or not isinstance(parsed.event, PhotoUploaded):
        return parsed
    try:
        photo = prepare_photo(parsed, limits)
    except PhotoError as e:
        return parsed.dead(e.stage, str(e))
    return to_contribution(photo, embed(photo))
