"""Fetch, verify and decode photos; keep only whitelisted coarse metadata.

Pixels exist only in memory for the few milliseconds between decoding and embedding. Of the photo's
metadata only `pixels.METADATA_WHITELIST` is read (GPS, serial numbers, names, XMP, maker notes and
embedded thumbnails are never read into any record, so nothing downstream can store them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import apache_beam as beam
import fsspec
import numpy as np
import torch
import torchvision
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image
from torchvision.io import ImageReadMode

from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.transforms.faces import mask_faces
from stylestream.transforms.features import aesthetic_features
from stylestream.transforms.pixels import (
    EXIF_TRANSPOSE,
    FORMATS,
    ORIENTATION,
    DecodeLimits,
    PhotoError,
    checked,
    decode_pillow,
    draft,
    image_errors,
    small,
    whitelisted_metadata,
)
from stylestream.transforms.records import DeadLetter, PreparedPhoto, Sourced

OK, DEAD, JPEG = "ok", "dead", "jpeg"
log = logging.getLogger(__name__)


def choose_rendition(event: PhotoUploaded, min_side: int) -> ImageRef | None:
    """The smallest referenced image whose shorter side is at least `min_side` (the original otherwise)."""
    big_enough = [r for r in event.renditions if r.width and r.height and min(r.width, r.height) >= min_side]
    if big_enough:
        return min(big_enough, key=lambda r: r.width * r.height)
    return event.image


LIBRARY_SCHEME = "library://"  # library://<library id>/<path inside the library>: backfilled photos


@functools.lru_cache(maxsize=4)
def _registry(path: str, mtime_ns: int) -> dict[str, str]:
    """The registry's roots, read again only when the file changes (not once per photo)."""
    return json.loads(Path(path).read_text())


def resolve_uri(uri: str, libraries: str | None) -> str:
    """A readable URL for `uri`: library:// references through the registry of this host's libraries
    (so events name no local folder or user name), anything else as it is."""
    if not uri.startswith(LIBRARY_SCHEME):
        return uri
    library_id, _, relative = uri.removeprefix(LIBRARY_SCHEME).partition("/")
    try:
        roots = _registry(libraries, Path(libraries).stat().st_mtime_ns) if libraries else {}
    except (OSError, ValueError):
        roots = {}
    if library_id not in roots:
        raise PhotoError("fetch", f"library {library_id} is not registered on this ingestion host; backfill it "
                                  "with this host's --data-dir")
    return (Path(roots[library_id]) / unquote(relative)).as_uri()


def fetch(ref: ImageRef, limits: DecodeLimits) -> bytes:
    """The image bytes behind a reference, checked against its declared size and sha256."""
    if ref.size_bytes > limits.max_bytes:
        raise PhotoError("fetch", f"{ref.size_bytes} bytes is over the {limits.max_bytes}-byte limit")
    uri = resolve_uri(ref.uri, limits.libraries)
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except (OSError, ValueError) as e:
        raise PhotoError("fetch", f"cannot read {ref.uri}: {type(e).__name__}: {e}") from None
    if len(data) != ref.size_bytes:
        raise PhotoError("fetch", f"{ref.uri} has {len(data)} bytes, the event says {ref.size_bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise PhotoError("fetch", f"{ref.uri} sha256 is {digest}, the event says {ref.sha256}")
    return data


def decode(data: bytes, limits: DecodeLimits,
           content_type: str | None = None) -> tuple[Image.Image, dict[str, float | int | str]]:
    """A small upright sRGB image (at least `min_side` on its shorter side when the source allows)
    and the whitelisted metadata. Every way a file can be unusable raises PhotoError with a reason.
    With `limits.jpeg_device`, the JPEGs the batched decoder takes are decoded by it (a batch of one)."""
    if limits.jpeg_device and (jpeg := batchable_jpeg(data, limits, content_type)):
        [image] = decode_jpeg_batch([jpeg], limits)
        if image is not None:
            return image, jpeg.metadata
    return decode_pillow(data, limits, content_type)

JPEG_DEVICES = ("cpu", "cuda")  # a basis names one of these: the decoder, not which GPU of a machine


def check_jpeg_device(device: str, here: bool = True) -> None:
    """Raises ValueError unless `device` is one the batched decoder runs on and, with `here`, one this
    machine has (a launcher may set the workers' device without one)."""
    if device not in JPEG_DEVICES:
        raise ValueError(f"jpeg device {device!r}: the batched JPEG decoder runs on {' or '.join(JPEG_DEVICES)}")
    if here and device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"jpeg device {device!r}: this machine has no CUDA GPU")


@dataclass(frozen=True)
class BatchableJpeg:
    """A JPEG the batched decoder takes, with what decoding needs from its header."""

    data: bytes
    metadata: dict[str, float | int | str]
    size: tuple[int, int]  # (width, height) `decode` gives before orientation: after draft mode
    orientation: int  # EXIF orientation, 1 = upright


def batchable_jpeg(data: bytes, limits: DecodeLimits, content_type: str | None = None) -> BatchableJpeg | None:
    """The header of a JPEG the batched decoder decodes as `decode` would (YCbCr or grey, no colour
    profile to apply), or None. Reads the header only; raises PhotoError as `decode` does."""
    with image_errors(), Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
        checked(im, limits, content_type)
        if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.info.get("icc_profile"):
            return None
        metadata = whitelisted_metadata(im)
        orientation = im.getexif().get(ORIENTATION, 1)
        draft(im, limits)
        return BatchableJpeg(data, metadata, im.size, orientation if orientation in EXIF_TRANSPOSE else 1)


def decode_jpeg_batch(jpegs: Sequence[BatchableJpeg], limits: DecodeLimits) -> list[Image.Image | None]:
    """The JPEGs decoded in one call on `limits.jpeg_device` (torchvision; nvJPEG on CUDA), scaled with
    block averages to the size draft mode gives, turned upright and made small as `decode` does. None
    for each photo the decoder could not finish (the caller decodes those alone, and Pillow decides)."""
    # 1. Decode the batch on the device (the bytes stay on the CPU, as torchvision asks).
    try:
        tensors = torchvision.io.decode_jpeg([torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs],
                                             mode=ImageReadMode.RGB, device=limits.jpeg_device)
    except RuntimeError as e:  # a photo it refuses, or the device out of memory: Pillow decides, one by one
        log.warning("the batched JPEG decoder refused %d photos (%s); decoding them one by one", len(jpegs), e)
        return [None] * len(jpegs)
    images: list[Image.Image | None] = []
    for jpeg, pixels in zip(jpegs, tensors, strict=True):
        try:
            # 2. Scale to draft mode's size on the device (the full-size pixels never cross to the CPU):
            #    draft mode scales by 1/2, 1/4 or 1/8 in the DCT, close to averaging each 2x2, 4x4 or 8x8 block.
            width, height = jpeg.size
            if pixels.shape[1:] != (height, width):
                area = torch.nn.functional.interpolate(pixels[None].float(), (height, width), mode="area")
                pixels = area[0].round().to(torch.uint8)
            image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
        except RuntimeError as e:  # out of memory scaling a large one: that photo alone, one by one
            log.warning("could not scale a batch-decoded JPEG (%s); decoding it alone", e)
            images.append(None)
            continue
        # 3. Upright and small, as `decode` makes Pillow's images.
        if jpeg.orientation != 1:
            image = image.transpose(EXIF_TRANSPOSE[jpeg.orientation])
        images.append(small(image, limits))
    del tensors  # the batch's full-size pixels, before the next batch is decoded
    return images


def style_image(data: bytes, limits: DecodeLimits, content_type: str | None = None,
                ) -> tuple[Image.Image, np.ndarray, dict[str, float | int | str]]:
    """A photo's bytes as the style sees them: (the decoded image, faces filled if configured; its
    aesthetic features; the whitelisted metadata). Ingestion and `stylestream verify` both call it."""
    return styled(*decode(data, limits, content_type), limits)


def styled(image: Image.Image, metadata: dict[str, float | int | str], limits: DecodeLimits,
           ) -> tuple[Image.Image, np.ndarray, dict[str, float | int | str]]:
    """A decoded photo as the style sees it (see `style_image`)."""
    if limits.mask_faces:
        image = mask_faces(image)
    return image, aesthetic_features(image), metadata


def photo_bytes(sourced: Sourced, limits: DecodeLimits) -> tuple[bytes, str | None]:
    """An upload's image bytes (inline, or its smallest big-enough rendition fetched and checked) and
    their declared content type."""
    event: PhotoUploaded = sourced.event
    inline = event.inline_bytes()
    if inline is not None:
        return inline, None
    ref = choose_rendition(event, limits.min_side)
    return fetch(ref, limits), ref.content_type


def prepare_photo(sourced: Sourced, limits: DecodeLimits) -> PreparedPhoto:
    data, content_type = photo_bytes(sourced, limits)
    return PreparedPhoto(sourced, *style_image(data, limits, content_type))


def prepare_or_dead(sourced: Sourced, limits: DecodeLimits,
                    ) -> tuple[str, PreparedPhoto | DeadLetter | tuple[Sourced, BatchableJpeg]]:
    """(OK, the prepared photo) or (DEAD, its dead letter with the reason); with a `jpeg_device`,
    (JPEG, (the upload, its header)) for a JPEG that waits for the batched decoder."""
    try:
        data, content_type = photo_bytes(sourced, limits)
        if limits.jpeg_device and (jpeg := batchable_jpeg(data, limits, content_type)):
            return JPEG, (sourced, jpeg)
        return OK, PreparedPhoto(sourced, *style_image(data, limits, content_type))
    except PhotoError as e:
        return DEAD, sourced.dead(e.stage, str(e))


def prepare_decoded(sourced: Sourced, jpeg: BatchableJpeg, image: Image.Image | None,
                    limits: DecodeLimits) -> tuple[str, PreparedPhoto | DeadLetter]:
    """A JPEG after the batched decoder: styled, or decoded alone when the batch was refused (the
    decoder then takes it alone if it can, else Pillow does or says why not)."""
    try:
        decoded = (image, jpeg.metadata) if image is not None else decode(jpeg.data, limits)
        return OK, PreparedPhoto(sourced, *styled(*decoded, limits))
    except PhotoError as e:
        return DEAD, sourced.dead(e.stage, str(e))


JPEG_BATCH = 64  # JPEGs per call of the batched decoder


class PrepareOnThreads(beam.DoFn):
    """Fetches and decodes on a pool of threads (Pillow and file reads release the GIL), so a bundle's
    photos are decoded on every core while the steps after this one embed those already done. At most
    `2 * workers` photos are in flight; outputs keep the input order, each with its own timestamp and
    window. With `limits.jpeg_device`, JPEGs are read on the threads and wait (their bytes, up to
    `jpeg_batch` of them, beside those in flight) to be decoded `jpeg_batch` at a time on that device,
    then are styled on the threads again: they come out a batch at a time, after photos read later."""

    def __init__(self, limits: DecodeLimits, workers: int, jpeg_batch: int = JPEG_BATCH):
        self._limits, self._workers, self._jpeg_batch = limits, workers, jpeg_batch

    def setup(self):
        if self._limits.jpeg_device:
            check_jpeg_device(self._limits.jpeg_device)  # never fall back to Pillow unseen
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="decode")

    def start_bundle(self):
        self._pending: collections.deque = collections.deque()  # (future, timestamp, window)
        self._jpegs: list = []  # ((upload, header), timestamp, window) waiting for the batched decoder

    def process(self, sourced: Sourced, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._pending.append((self._pool.submit(prepare_or_dead, sourced, self._limits), timestamp, window))
        yield from self._drain(until_done=False)

    def finish_bundle(self):
        while self._pending or self._jpegs:
            yield from self._drain(until_done=True)
            self._decode_jpegs()

    def _drain(self, until_done: bool):
        """Outputs the finished photos at the head; waits for the head while more than `2 * workers`
        are in flight, or for all when `until_done`."""
        while self._pending and (until_done or self._pending[0][0].done() or len(self._pending) > 2 * self._workers):
            future, timestamp, window = self._pending.popleft()
            tag, value = future.result()  # anything but a PhotoError fails the bundle, as it would serially
            if tag == JPEG:
                self._jpegs.append((value, timestamp, window))
                if len(self._jpegs) >= self._jpeg_batch:
                    self._decode_jpegs()
                continue
            windowed = WindowedValue(value, timestamp, [window])
            yield windowed if tag == OK else beam.pvalue.TaggedOutput(DEAD, windowed)

    def _decode_jpegs(self):
        """The waiting JPEGs through the batched decoder; styling them goes back to the threads."""
        if not self._jpegs:
            return
        batch, self._jpegs = self._jpegs, []
        images = decode_jpeg_batch([jpeg for (_, jpeg), _, _ in batch], self._limits)
        for ((sourced, jpeg), timestamp, window), image in zip(batch, images, strict=True):
            self._pending.append((self._pool.submit(prepare_decoded, sourced, jpeg, image, self._limits),
                                  timestamp, window))

    def teardown(self):
        self._pool.shutdown(cancel_futures=True)


class PreparePhotos(beam.PTransform):
    """Uploads -> `ok` (PreparedPhoto: small image, features, whitelisted metadata) and `dead`, decoded
    on `workers` threads (default: one per core), JPEGs a batch at a time on `limits.jpeg_device`."""

    def __init__(self, limits: DecodeLimits = DecodeLimits(), workers: int | None = None,
                 jpeg_batch: int = JPEG_BATCH):
        super().__init__()
        self._step = PrepareOnThreads(limits, workers or os.cpu_count() or 1, jpeg_batch)

    def expand(self, uploads):
        return uploads | beam.ParDo(self._step).with_outputs(DEAD, main=OK)
