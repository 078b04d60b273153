"""Each aesthetic feature moves the right way under a known edit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from stylestream.demo.synthetic import LOOKS, render
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.features import aesthetic_features, srgb_to_lab


def feats(image: Image.Image) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, aesthetic_features(image), strict=True))


@pytest.fixture(params=["warm", "cool"])
def photo(request) -> Image.Image:
    return render(LOOKS[request.param], seed=11, size=(320, 240))


def warming_filter(im: Image.Image) -> Image.Image:
    a = np.asarray(im, float)
    return Image.fromarray(np.clip(a * [1.15, 1.0, 0.8], 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("edit", "feature", "direction"), [
    (warming_filter, "warmth", +1),
    (lambda im: ImageEnhance.Color(im).enhance(0.3), "saturation", -1),
    (lambda im: ImageEnhance.Color(im).enhance(0.3), "colourfulness", -1),
    (lambda im: im.filter(ImageFilter.GaussianBlur(2)), "sharpness", -1),
    (lambda im: ImageEnhance.Brightness(im).enhance(1.3), "brightness", +1),
    (lambda im: ImageEnhance.Contrast(im).enhance(0.5), "contrast", -1),
    (lambda im: Image.blend(im, Image.new("RGB", im.size, "white"), 0.7), "highlights", +1),
    (lambda im: ImageEnhance.Brightness(im).enhance(0.4), "shadows", +1),
])
def test_edit_moves_feature(photo, edit, feature, direction):
    before, after = feats(photo)[feature], feats(edit(photo))[feature]
    assert (after - before) * direction > 0.01 * max(1.0, abs(before)), (feature, before, after)


def subject_at(cx: float, cy: float, size=(300, 200)) -> Image.Image:
    im = Image.new("RGB", size, (30, 40, 50))
    w, h = size
    r = min(w, h) // 8
    ImageDraw.Draw(im).ellipse((cx * w - r, cy * h - r, cx * w + r, cy * h + r), fill=(250, 220, 120))
    return im


def test_every_feature_carries_its_own_information():
    """No feature is another one under a new name (or rescaled): across photos of every look, with
    tonal edits, no two features are perfectly correlated."""
    images = [edit(render(look, seed=s, size=(160, 120))) for look in LOOKS.values() for s in range(4)
              for edit in (lambda im: im, lambda im: ImageEnhance.Contrast(im).enhance(1.8))]
    table = np.stack([aesthetic_features(im) for im in images]).astype(float)
    corr = np.corrcoef(table, rowvar=False)
    pairs = [(FEATURE_NAMES[i], FEATURE_NAMES[j], round(corr[i, j], 4))
             for i in range(len(FEATURE_NAMES)) for j in range(i + 1, len(FEATURE_NAMES))
             if abs(corr[i, j]) > 0.9999]
    assert not pairs


def test_crop_that_puts_the_subject_on_a_third_raises_thirds_energy_and_breaks_symmetry():
    centred = subject_at(0.5, 0.5, (600, 400))
    cropped = centred.crop((150, 100, 600, 400))  # subject now at (1/3, 1/3) of the crop
    f0, f1 = feats(centred), feats(cropped)
    assert f1["thirds_energy"] > 2 * f0["thirds_energy"]
    assert f0["symmetry"] > 0.95 and f1["symmetry"] < f0["symmetry"] - 0.2


def test_palette_lists_dominant_colours_most_frequent_first():
    im = Image.new("RGB", (100, 100), (200, 30, 30))
    ImageDraw.Draw(im).rectangle((0, 0, 29, 99), fill=(30, 30, 200))
    f = feats(im)
    red = srgb_to_lab(np.array([200, 30, 30]) / 255) / 100
    blue = srgb_to_lab(np.array([30, 30, 200]) / 255) / 100
    np.testing.assert_allclose([f["palette1_l"], f["palette1_a"], f["palette1_b"]], red, atol=0.02)
    np.testing.assert_allclose([f["palette2_l"], f["palette2_a"], f["palette2_b"]], blue, atol=0.02)


def test_features_do_not_depend_on_resolution(photo):
    big = photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.LANCZOS)
    np.testing.assert_allclose(aesthetic_features(big)[:5], aesthetic_features(photo)[:5], atol=0.03)
