"""Decoding real photos: formats, orientation, reduced-size decoding, colour profiles, and every
way a file can be unusable giving a clear reason."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image, ImageCms

from stylestream.demo.synthetic import LOOKS, render
from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.transforms.images import DecodeLimits, PhotoError, choose_rendition, decode, fetch

LIMITS = DecodeLimits()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return render(LOOKS["warm"], seed=5, size=(480, 360))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF"])
def test_formats_decode_to_the_same_picture(photo, fmt):
    out, _ = decode(encode(photo, fmt, quality=95) if fmt != "PNG" else encode(photo, fmt), LIMITS)
    assert out.mode == "RGB" and out.size == photo.size
    assert np.abs(np.asarray(out, float) - np.asarray(photo, float)).mean() < 4


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    out, _ = decode(encode(photo, "JPEG", exif=exif), LIMITS)
    assert out.size == (photo.height, photo.width)


def test_large_jpeg_is_decoded_at_reduced_size():
    big = render(LOOKS["cool"], seed=1, size=(4000, 3000))
    out, _ = decode(encode(big, "JPEG", quality=85), LIMITS)
    assert LIMITS.min_side <= min(out.size) <= 2 * LIMITS.min_side
    assert abs(out.width / out.height - 4 / 3) < 0.02


def test_colour_profile_is_applied_and_a_broken_one_is_refused(photo):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out, _ = decode(encode(photo, "PNG", icc_profile=srgb), LIMITS)
    assert np.abs(np.asarray(out, float) - np.asarray(photo, float)).max() <= 2
    with pytest.raises(PhotoError, match="unusable colour profile"):
        decode(encode(photo, "PNG", icc_profile=b"not a profile" * 20), LIMITS)


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    out, _ = decode(encode(im, "PNG"), LIMITS)
    assert out.getpixel((10, 10)) == (255, 255, 255)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: encode(p, "JPEG")[:3000], "truncated or corrupt"),
    (lambda p: b"\x89PNG\r\n\x1a\n" + bytes(500), "not an image|truncated or corrupt"),
    (lambda p: bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not an image"),
    (lambda p: b"GIF89a" + bytes(100), "not an image"),  # a real format we do not take
])
def test_unusable_bytes_give_a_clear_reason(photo, make, reason):
    with pytest.raises(PhotoError, match=reason):
        decode(make(photo), LIMITS)


def test_mislabelled_file_is_refused(photo):
    with pytest.raises(PhotoError, match="declared image/jpeg but the bytes are PNG"):
        decode(encode(photo, "PNG"), LIMITS, "image/jpeg")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (6000, 6000)), "PNG")  # 36 MP in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(PhotoError, match="pixels is over"):
        decode(bomb, DecodeLimits(max_pixels=20_000_000))


def test_fetch_checks_size_sha_and_limit(tmp_path, photo):
    data = encode(photo, "JPEG")
    path = tmp_path / "p.jpg"
    path.write_bytes(data)
    ref = ImageRef(uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    assert fetch(ref, LIMITS) == data
    with pytest.raises(PhotoError, match="sha256"):
        fetch(ref.model_copy(update={"sha256": "0" * 64}), LIMITS)
    with pytest.raises(PhotoError, match="bytes, the event says"):
        fetch(ref.model_copy(update={"size_bytes": len(data) + 1}), LIMITS)
    with pytest.raises(PhotoError, match="over the 1000-byte limit"):
        fetch(ref, DecodeLimits(max_bytes=1000))
    with pytest.raises(PhotoError, match="cannot read"):
        fetch(ref.model_copy(update={"uri": (tmp_path / "gone.jpg").as_uri()}), LIMITS)


def test_smallest_rendition_that_is_large_enough_is_chosen():
    def ref(w, h):
        return ImageRef(uri=f"file:///r{w}.jpg", sha256="a" * 64, size_bytes=1, width=w, height=h)
    event = PhotoUploaded(event_id="e", user_id="u", event_time=datetime.now(UTC), photo_id="p",
                          image=ref(4000, 3000), renditions=[ref(2048, 1536), ref(400, 300), ref(200, 150)])
    assert choose_rendition(event, 224).width == 400
    assert choose_rendition(event, 2000).width == 4000
