"""Contributions computed on the person's device (photo_embedded events).

The device side (`contributions`, what `stylestream device sync` runs) decodes, masks, measures
and embeds each photo with ingestion's own code and sends only what a style needs; ingestion checks
each event against the basis its state computes with (`DeviceChecks`) and counts it exactly as an
upload it decoded and embedded itself."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from stylestream.models.clip import ClipSpec, embedding_dim
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import DeviceBasis, DeviceContribution, PhotoEmbedded
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.embed import LoadedClip, OpenClipImageHandler, embed_images
from stylestream.transforms.images import style_image
from stylestream.transforms.manifest import device_basis
from stylestream.transforms.pixels import DecodeLimits, PhotoError
from stylestream.transforms.records import Contribution, Sourced, capture_day, kept_upload


def device_contribution(parsed: Sourced, expected: DeviceBasis, dim: int,
                        max_bytes: int) -> Contribution | DeadLetter:
    """A photo_embedded event as the contribution it makes, or a dead letter saying why it cannot
    count here (computed with another model, weights or preprocessing, of the wrong size, or of a
    file larger than an upload may be)."""
    event: PhotoEmbedded = parsed.event
    if event.size_bytes > max_bytes:
        return parsed.dead("validate", f"the photo is {event.size_bytes} bytes, over the {max_bytes}-byte limit")
    if event.basis != expected:
        theirs, ours = event.basis.model_dump(), expected.model_dump()
        differ = ", ".join(f"{k} {theirs[k]!r} (this state: {ours[k]!r})" for k in ours if theirs[k] != ours[k])
        return parsed.dead("basis", f"computed with another basis: {differ}")
    if len(event.embedding) != dim:
        return parsed.dead("validate", f"the embedding has {len(event.embedding)} dimensions, this state's model {dim}")
    return Contribution(kept_upload(event), np.asarray(event.embedding, np.float32),
                        np.asarray([event.features[n] for n in FEATURE_NAMES], np.float32), {}, event.sha256,
                        offset=parsed.offset, source=parsed)


class DeviceChecks:
    """`device_contribution` with this state's basis and embedding size, worked out once."""

    def __init__(self, clip: ClipSpec, limits: DecodeLimits):
        self.expected, self.dim, self.max_bytes = device_basis(clip, limits), embedding_dim(clip), limits.max_bytes

    def __call__(self, parsed: Sourced) -> Contribution | DeadLetter:
        return device_contribution(parsed, self.expected, self.dim, self.max_bytes)


@dataclass(frozen=True)
class DevicePhoto:
    """A photo on the person's device, as the device side reads it."""

    photo_id: str
    album_id: str | None
    data: bytes  # the file's bytes: read here, never sent
    taken_at: datetime


def contributions(photos: Sequence[DevicePhoto], clip: ClipSpec, limits: DecodeLimits,
                  handler: OpenClipImageHandler, model: LoadedClip,
                  ) -> list[DeviceContribution | tuple[DevicePhoto, PhotoError]]:
    """What each photo contributes to its person's style, in the photos' order, computed with
    ingestion's own decoding, face masking, features and embedding (`style_image`, the same open_clip
    handler), as a device sends it; a photo that cannot be used is there with the reason instead.
    Nothing of a photo but its sha256, size, day taken, embedding and named features is in a
    contribution."""
    basis = device_basis(clip, limits)
    out: list = list(photos)
    usable = []
    for i, photo in enumerate(photos):
        try:
            image, features, _metadata = style_image(photo.data, limits)  # the metadata stays on the device
        except PhotoError as e:
            out[i] = (photo, e)
            continue
        usable.append((i, photo, image, features))
    embeddings = embed_images(handler, model, [image for _, _, image, _ in usable]) if usable else []
    for (i, photo, _, features), embedding in zip(usable, embeddings, strict=True):
        out[i] = DeviceContribution(
            photo_id=photo.photo_id, album_id=photo.album_id, taken_at=capture_day(photo.taken_at),
            sha256=hashlib.sha256(photo.data).hexdigest(), size_bytes=len(photo.data),
            embedding=[float(x) for x in embedding],
            features={n: float(f) for n, f in zip(FEATURE_NAMES, features, strict=True)}, basis=basis)
    return out
