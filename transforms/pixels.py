"""Photos decoded by Pillow alone: the formats taken, the limits, the reasons a file is refused, the
whitelisted metadata. Light to import (no torch, no Beam), so the HTTP API checks an uploaded image
by the same rules ingestion does.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

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

@contextlib.contextmanager
def image_errors() -> Iterator[None]:
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


def checked(im: Image.Image, limits: DecodeLimits, content_type: str | None) -> None:
    """PhotoError unless the bytes are the declared format and within the pixel limit (before decoding)."""
    declared = CONTENT_TYPES.get(content_type or "")
    if declared and im.format not in declared:
        raise PhotoError("image", f"declared {content_type} but the bytes are {im.format}")
    if im.width * im.height > limits.max_pixels:
        raise PhotoError("image", f"{im.width}x{im.height} pixels is over the {limits.max_pixels} limit")


def draft(im: Image.Image, limits: DecodeLimits) -> None:
    """JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: far cheaper. Sets the
    size decoding will give (`im.size`) without decoding."""
    scale = min(im.width, im.height) / limits.min_side
    if im.format == "JPEG" and scale >= 2:
        im.draft(im.mode, (im.width // int(scale), im.height // int(scale)))


def small(rgb: Image.Image, limits: DecodeLimits) -> Image.Image:
    """At most twice `min_side` on the shorter side."""
    if min(rgb.size) > 2 * limits.min_side:
        rgb.thumbnail((2 * limits.min_side * rgb.width // min(rgb.size),
                       2 * limits.min_side * rgb.height // min(rgb.size)), Image.Resampling.BILINEAR)
    return rgb


def decode_pillow(data: bytes, limits: DecodeLimits,
                  content_type: str | None = None) -> tuple[Image.Image, dict[str, float | int | str]]:
    """A small upright sRGB image (at least `min_side` on its shorter side when the source allows)
    and the whitelisted metadata, decoded by Pillow. Every way a file can be unusable raises
    PhotoError with a reason."""
    with image_errors(), Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
        checked(im, limits, content_type)
        metadata = whitelisted_metadata(im)
        icc = im.info.get("icc_profile")
        draft(im, limits)
        im.load()
        upright = ImageOps.exif_transpose(im)
    return small(to_srgb(upright, icc), limits), metadata


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
