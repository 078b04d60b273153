"""Fetch, verify and decode photos; keep only whitelisted coarse metadata.

Pixels exist only in memory for the few milliseconds between decoding and embedding. Of the photo's
metadata only `METADATA_WHITELIST` is read (GPS, serial numbers, names, XMP, maker notes and
embedded thumbnails are never read into any record, so nothing downstream can store them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import apache_beam as beam
import fsspec
import numpy as np
import pillow_heif
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.transforms.faces import mask_faces
from stylestream.transforms.features import aesthetic_features
from stylestream.transforms.records import DeadLetter, PreparedPhoto, Sourced

OK, DEAD = "ok", "dead"

pillow_heif.register_heif_opener()
FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")  # phone MPO files open as JPEG
CONTENT_TYPES = {"image/jpeg": {"JPEG", "MPO"}, "image/png": {"PNG"}, "image/webp": {"WEBP"},
                 "image/heic": {"HEIF"}, "image/heif": {"HEIF"}}
SRGB = ImageCms.createProfile("sRGB")

# EXIF tag id -> stored name. Coarse capture settings only; the capture time is reduced to its hour.
METADATA_WHITELIST = {
    0x920A: "focal_length_mm",
    0x829D: "f_number",
    0x829A: "exposure_time_s",
    0x8827: "iso",
    0x9209: "flash",
}
# Everything a photo's record keeps of its metadata (README "What a style is" lists the same).
KEPT_METADATA = (*METADATA_WHITELIST.values(), "hour_of_day")
EXIF_IFD = 0x8769
DATETIME_ORIGINAL = 0x9003


# Bumped whenever decoding changes what the embedding or the features see (manifests name it).
PREPROCESSING_VERSION = "decode-v1"


@dataclass(frozen=True)
class DecodeLimits:
    """How photos are decoded: the limits on what is accepted, and whether faces are masked."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 100_000_000  # decompression-bomb guard
    min_side: int = 224  # decode at reduced size, but never below this
    mask_faces: bool = False  # fill faces before the features and the embedding see them
    libraries: str | None = None  # the registry of library:// roots (pipelines/library.py), a JSON file

    @property
    def preprocessing(self) -> str:
        """The preprocessing's name in style manifests."""
        return PREPROCESSING_VERSION + ("+mask-faces" if self.mask_faces else "")


class PhotoError(ValueError):
    """A photo that cannot be used; the message is the dead-letter reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


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
    and the whitelisted metadata. Every way a file can be unusable raises PhotoError with a reason."""
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            declared = CONTENT_TYPES.get(content_type or "")
            if declared and im.format not in declared:
                raise PhotoError("image", f"declared {content_type} but the bytes are {im.format}")
            if im.width * im.height > limits.max_pixels:
                raise PhotoError("image", f"{im.width}x{im.height} pixels is over the {limits.max_pixels} limit")
            metadata = whitelisted_metadata(im)
            icc = im.info.get("icc_profile")
            # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: far cheaper.
            scale = min(im.width, im.height) / limits.min_side
            if im.format == "JPEG" and scale >= 2:
                im.draft(im.mode, (im.width // int(scale), im.height // int(scale)))
            im.load()
            upright = ImageOps.exif_transpose(im)
    except PhotoError:
        raise
    except Image.DecompressionBombError as e:
        raise PhotoError("image", f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise PhotoError("image", f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise PhotoError("image", f"truncated or corrupt image: {type(e).__name__}: {e}") from None
    rgb = to_srgb(upright, icc)
    if min(rgb.size) > 2 * limits.min_side:
        rgb.thumbnail((2 * limits.min_side * rgb.width // min(rgb.size),
                       2 * limits.min_side * rgb.height // min(rgb.size)), Image.Resampling.BILINEAR)
    return rgb, metadata


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """RGB in the sRGB colour space: embedded colour profiles applied, transparency composited on white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            mode = "CMYK" if im.mode == "CMYK" else "RGB"
            return ImageCms.profileToProfile(im.convert(mode), src, SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as e:
            raise PhotoError("image", f"unusable colour profile: {e}") from None
    return im.convert("RGB")


def whitelisted_metadata(im: Image.Image) -> dict[str, float | int | str]:
    exif = im.getexif()
    sub = exif.get_ifd(EXIF_IFD)
    out: dict[str, float | int | str] = {}
    for tag, name in METADATA_WHITELIST.items():
        value = sub.get(tag, exif.get(tag))
        if isinstance(value, tuple):  # some writers store ISO as a tuple
            value = value[0] if value else None
        if value is not None:
            try:
                out[name] = round(float(value), 4)
            except (TypeError, ValueError, ZeroDivisionError):
                continue
    taken = sub.get(DATETIME_ORIGINAL)
    if isinstance(taken, str) and len(taken) >= 13 and taken[11:13].isdigit():
        out["hour_of_day"] = int(taken[11:13])
    return out


def style_image(data: bytes, limits: DecodeLimits, content_type: str | None = None,
                ) -> tuple[Image.Image, np.ndarray, dict[str, float | int | str]]:
    """A photo's bytes as the style sees them: (the decoded image, faces filled if configured; its
    aesthetic features; the whitelisted metadata). Ingestion and `stylestream verify` both call it."""
    image, metadata = decode(data, limits, content_type)
    if limits.mask_faces:
        image = mask_faces(image)
    return image, aesthetic_features(image), metadata


def prepare_photo(sourced: Sourced, limits: DecodeLimits) -> PreparedPhoto:
    event: PhotoUploaded = sourced.event
    ref = choose_rendition(event, limits.min_side)
    inline = event.inline_bytes()
    data = inline if inline is not None else fetch(ref, limits)
    image, features, metadata = style_image(data, limits, ref.content_type if inline is None else None)
    return PreparedPhoto(sourced, image, features, metadata)


def prepare_or_dead(sourced: Sourced, limits: DecodeLimits) -> tuple[str, PreparedPhoto | DeadLetter]:
    """(OK, the prepared photo) or (DEAD, its dead letter with the reason)."""
    try:
        return OK, prepare_photo(sourced, limits)
    except PhotoError as e:
        return DEAD, sourced.dead(e.stage, str(e))


class PrepareOnThreads(beam.DoFn):
    """Fetches and decodes on a pool of threads (Pillow and file reads release the GIL), so a bundle's
    photos are decoded on every core while the steps after this one embed those already done. At most
    `2 * workers` photos are in flight; outputs keep the input order, each with its own timestamp and
    window."""

    def __init__(self, limits: DecodeLimits, workers: int):
        self._limits, self._workers = limits, workers

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="decode")

    def start_bundle(self):
        self._pending: collections.deque = collections.deque()

    def process(self, sourced: Sourced, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._pending.append((self._pool.submit(prepare_or_dead, sourced, self._limits), timestamp, window))
        while self._pending and (self._pending[0][0].done() or len(self._pending) > 2 * self._workers):
            yield self._output(*self._pending.popleft())

    def finish_bundle(self):
        while self._pending:
            yield self._output(*self._pending.popleft())

    @staticmethod
    def _output(future: concurrent.futures.Future, timestamp, window):
        tag, value = future.result()  # anything but a PhotoError fails the bundle, as it would serially
        windowed = WindowedValue(value, timestamp, [window])
        return windowed if tag == OK else beam.pvalue.TaggedOutput(DEAD, windowed)

    def teardown(self):
        self._pool.shutdown(cancel_futures=True)


class PreparePhotos(beam.PTransform):
    """Uploads -> `ok` (PreparedPhoto: small image, features, whitelisted metadata) and `dead`, decoded
    on `workers` threads (default: one per core)."""

    def __init__(self, limits: DecodeLimits = DecodeLimits(), workers: int | None = None):
        super().__init__()
        self._limits, self._workers = limits, workers or os.cpu_count() or 1

    def expand(self, uploads):
        return uploads | beam.ParDo(PrepareOnThreads(self._limits, self._workers)).with_outputs(DEAD, main=OK)
