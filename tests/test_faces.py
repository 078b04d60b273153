"""--mask-faces on a real photograph (scikit-image's astronaut portrait): the face is found, and once
masked it no longer shapes the style."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
import pytest
from helpers import latest_styles, produce
from PIL import Image
from skimage import data

from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.streams.topics import PHOTO_EVENTS
from stylestream.transforms.faces import find_faces, masked_region
from stylestream.transforms.images import DecodeLimits, decode


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def portraits() -> tuple[bytes, bytes]:
    """The portrait, and the same with only the inside of the face changed: desaturated, which keeps
    its grey levels, so the detector sees the same face."""
    portrait = data.astronaut()
    [(x, y, w, h)] = find_faces(Image.fromarray(portrait))
    changed = portrait.copy()
    inside = changed[y + h // 5: y + h - h // 5, x + w // 5: x + w - w // 5]
    grey = np.round(inside @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    changed[y + h // 5: y + h - h // 5, x + w // 5: x + w - w // 5] = grey[..., None]
    assert (changed != portrait).any()
    return png(portrait), png(changed)


def test_the_face_is_found_where_it_is(portraits):
    image, _ = decode(portraits[0], DecodeLimits())
    faces = find_faces(image)
    assert faces, "no face found in the portrait"
    # the astronaut's face: upper middle of the picture, about a fifth of its width
    x, y, w, h = min(faces, key=lambda b: (b[1], b[0]))
    assert 0.25 < x / image.width < 0.45 and y / image.height < 0.2 and 0.12 < w / image.width < 0.3
    left, top, right, bottom = masked_region((x, y, w, h))
    assert left < x and top < y and right > x + w and bottom > y + h


def ingest_both(tmp_path, make_ingestor, bs: str, portraits: tuple[bytes, bytes], mask: bool) -> tuple:
    """Ingest the portrait as one person's photo and the changed one as another's; their styles."""
    events = []
    for user, raw in zip(("orig", "changed"), portraits, strict=True):
        path = tmp_path / f"{user}.png"
        path.write_bytes(raw)
        events.append(PhotoUploaded(
            event_id=f"up-{user}-{mask}", user_id=f"{user}-{mask}", event_time=datetime(2025, 6, 1, tzinfo=UTC),
            photo_id="astronaut", image=ImageRef(uri=path.as_uri(), sha256=hashlib.sha256(raw).hexdigest(),
                                                 size_bytes=len(raw))))
    produce(bs, PHOTO_EVENTS, events)
    make_ingestor(f"state-{mask}", limits=DecodeLimits(mask_faces=mask)).run_until_caught_up()
    styles = latest_styles(bs)
    return styles[f"orig-{mask}"], styles[f"changed-{mask}"]


@pytest.mark.slow
def test_a_masked_face_does_not_shape_the_style(broker, make_ingestor, tmp_path, portraits):
    def gap(a, b) -> float:
        return max(np.abs(np.array(a.embedding) - b.embedding).max(),
                   max(abs(a.features[k] - b.features[k]) for k in a.features))

    masked = ingest_both(tmp_path, make_ingestor, broker.bootstrap_servers, portraits, mask=True)
    kept = ingest_both(tmp_path, make_ingestor, broker.bootstrap_servers, portraits, mask=False)
    assert gap(*masked) <= 1e-6
    assert gap(*kept) > 1e-4
    assert masked[0].style_code != kept[0].style_code  # the preprocessing is part of the basis
