"""Kafka messages -> what the per-user update takes: one composite for the local driver and the
streaming pipeline alike, so both parse, fetch, decode, strip and embed the same way."""

from __future__ import annotations

import apache_beam as beam

from stylestream.models.clip import ClipSpec
from stylestream.transforms.embed import EmbedPhotos
from stylestream.transforms.images import DecodeLimits, PreparePhotos
from stylestream.transforms.parse import ParseEvents


class StyleInputs(beam.PTransform):
    """messages -> {"contributions": embedded uploads, "deletes": Sourced deletions, "toggles": Sourced
    consent toggles, "dead": dead letters of every stage}."""

    def __init__(self, clip: ClipSpec, limits: DecodeLimits | None = None):
        super().__init__()
        self._clip, self._limits = clip, limits or DecodeLimits()

    def expand(self, messages):
        events = messages | "DecodeValidate" >> ParseEvents()
        photos = events.uploads | "FetchDecodeStripPII" >> PreparePhotos(self._limits)
        contributions = photos.ok | "Embed" >> EmbedPhotos(self._clip)
        dead = (events.dead, photos.dead) | "DeadLetters" >> beam.Flatten()
        return {"contributions": contributions, "deletes": events.deletes, "toggles": events.toggles, "dead": dead}
