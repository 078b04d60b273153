"""Decoding real photos: formats, orientation, reduced-size decoding, colour profiles, and every
way a file can be unusable giving a clear reason."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from stylestream.demo.synthetic import LOOKS, render
from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.transforms.features import aesthetic_features
from stylestream.transforms.images import (
    DecodeLimits,
    PhotoError,
    batchable_jpeg,
    check_jpeg_device,
    choose_rendition,
    decode,
    decode_jpeg_batch,
    fetch,
)

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


# The batched decoder (torchvision) on the CPU: the same function nvJPEG runs through with "cuda".
BATCHED = DecodeLimits(jpeg_device="cpu")


def oriented(im: Image.Image, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif, **kw)


def test_batched_jpeg_decoder_gives_pillows_picture_within_tolerance():
    """Sizes and orientation exactly as Pillow's path, pixels within a level on average (draft mode's
    DCT scaling against averaging blocks), features within 0.02 (the documented tolerance)."""
    big = render(LOOKS["cool"], seed=1, size=(2400, 1800))
    grey = render(LOOKS["mono"], seed=3, size=(1200, 900)).convert("L")
    files = [encode(big, "JPEG", quality=90), oriented(big, 6, quality=90), oriented(big, 3, quality=90),
             encode(grey, "JPEG", quality=90), encode(render(LOOKS["warm"], seed=5, size=(480, 360)), "JPEG")]
    jpegs = [batchable_jpeg(data, BATCHED) for data in files]
    batched = decode_jpeg_batch(jpegs, BATCHED)
    for data, image in zip(files, batched, strict=True):
        pillow, _ = decode(data, LIMITS)
        assert image.mode == "RGB" and image.size == pillow.size
        diff = np.abs(np.asarray(image, float) - np.asarray(pillow, float))
        assert diff.mean() < 1 and diff.max() <= 8
        assert np.abs(aesthetic_features(image) - aesthetic_features(pillow)).max() < 0.02
        assert decode(data, BATCHED)[0].tobytes() == image.tobytes()  # alone or in a batch: the same pixels
    assert batched[1].size == (batched[0].height, batched[0].width)
    assert np.abs(np.asarray(batched[2], float) - np.asarray(batched[0], float)[::-1, ::-1]).mean() < 1


def test_what_the_batched_decoder_does_not_take_goes_to_pillow(photo):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for data in (encode(photo, "PNG"), encode(photo, "JPEG", icc_profile=srgb), encode(photo.convert("CMYK"), "JPEG")):
        assert batchable_jpeg(data, BATCHED) is None
        assert decode(data, BATCHED)[0].tobytes() == decode(data, LIMITS)[0].tobytes()
    with pytest.raises(PhotoError, match="declared image/png but the bytes are JPEG"):
        batchable_jpeg(encode(photo, "JPEG"), BATCHED, "image/png")


def test_a_batch_the_decoder_refuses_is_decoded_one_by_one(photo):
    good = batchable_jpeg(encode(photo, "JPEG"), BATCHED)
    truncated = batchable_jpeg(encode(photo, "JPEG")[:3000], BATCHED)  # the header reads; the rest is gone
    assert decode_jpeg_batch([good, truncated], BATCHED) == [None, None]
    assert decode(good.data, BATCHED)[0].tobytes() == decode_jpeg_batch([good], BATCHED)[0].tobytes()
    with pytest.raises(PhotoError, match="truncated or corrupt"):
        decode(truncated.data, BATCHED)


def test_jpeg_device_must_be_one_the_machine_has():
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        check_jpeg_device("meta")
    for device in ("gpu0", "cuda:1"):
        with pytest.raises(ValueError, match=f"jpeg device '{device}'"):
            check_jpeg_device(device)
    check_jpeg_device("cuda", here=False)  # the name alone: a launcher's check
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            check_jpeg_device("cuda")
    assert BATCHED.preprocessing == "decode-v1+jpeg-batch-cpu"
