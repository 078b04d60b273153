"""Fetch, verify and decode photos; keep only whitelisted coarse metadata.

Pixels exist only in memory for the few milliseconds between decoding and embedding. Of the photo's
metadata only `METADATA_WHITELIST` is read (GPS, serial numbers, names, XMP, maker notes and
embedded thumbnails are never read into any record, so nothing downstream can store them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
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
import pillow_heif
import torch
import torchvision
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode

from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.transforms.faces import mask_faces
from stylestream.transforms.features import aesthetic_features
from stylestream.transforms.records import DeadLetter, PreparedPhoto, Sourced

OK, DEAD, JPEG = "ok", "dead", "jpeg"
log = logging.getLogger(__name__)

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
ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose does).
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


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
    # Where JPEGs are decoded a batch at a time (torchvision: "cuda" is nvJPEG); None: Pillow, one by one.
    # Part of the style's basis: another decoder gives slightly other pixels, so verifying repeats it.
    jpeg_device: str | None = None

    @property
    def preprocessing(self) -> str:
        """The preprocessing's name in style manifests."""
        return (PREPROCESSING_VERSION + ("+mask-faces" if self.mask_faces else "")
                + (f"+jpeg-batch-{self.jpeg_device}" if self.jpeg_device else ""))


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


@contextlib.contextmanager
def _image_errors():
    """Every way a file can be unusable, as a PhotoError with a reason."""
    try:
        yield
    except PhotoError:
        raise
    except Image.DecompressionBombError as e:
        raise PhotoError("image", f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise PhotoError("image", f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise PhotoError("image", f"truncated or corrupt image: {type(e).__name__}: {e}") from None


def _checked(im: Image.Image, limits: DecodeLimits, content_type: str | None) -> None:
    declared = CONTENT_TYPES.get(content_type or "")
    if declared and im.format not in declared:
        raise PhotoError("image", f"declared {content_type} but the bytes are {im.format}")
    if im.width * im.height > limits.max_pixels:
        raise PhotoError("image", f"{im.width}x{im.height} pixels is over the {limits.max_pixels} limit")


def _draft(im: Image.Image, limits: DecodeLimits) -> None:
    """JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: far cheaper. Sets the
    size decoding will give (`im.size`) without decoding."""
    scale = min(im.width, im.height) / limits.min_side
    if im.format == "JPEG" and scale >= 2:
        im.draft(im.mode, (im.width // int(scale), im.height // int(scale)))


def _small(rgb: Image.Image, limits: DecodeLimits) -> Image.Image:
    """At most twice `min_side` on the shorter side."""
    if min(rgb.size) > 2 * limits.min_side:
        rgb.thumbnail((2 * limits.min_side * rgb.width // min(rgb.size),
                       2 * limits.min_side * rgb.height // min(rgb.size)), Image.Resampling.BILINEAR)
    return rgb


def decode(data: bytes, limits: DecodeLimits,
           content_type: str | None = None) -> tuple[Image.Image, dict[str, float | int | str]]:
    """A small upright sRGB image (at least `min_side` on its shorter side when the source allows)
    and the whitelisted metadata. Every way a file can be unusable raises PhotoError with a reason.
    With `limits.jpeg_device`, the JPEGs the batched decoder takes are decoded by it (a batch of one)."""
    if limits.jpeg_device and (jpeg := batchable_jpeg(data, limits, content_type)):
        [image] = decode_jpeg_batch([jpeg], limits)
        if image is not None:
            return image, jpeg.metadata
    with _image_errors(), Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
        _checked(im, limits, content_type)
        metadata = whitelisted_metadata(im)
        icc = im.info.get("icc_profile")
        _draft(im, limits)
        im.load()
        upright = ImageOps.exif_transpose(im)
    return _small(to_srgb(upright, icc), limits), metadata


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
    with _image_errors(), Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
        _checked(im, limits, content_type)
        if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.info.get("icc_profile"):
            return None
        metadata = whitelisted_metadata(im)
        orientation = im.getexif().get(ORIENTATION, 1)
        _draft(im, limits)
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
        images.append(_small(image, limits))
    del tensors  # the batch's full-size pixels, before the next batch is decoded
    return images


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
