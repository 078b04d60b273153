"""Interpretable aesthetic features of a photo, so style and its drift can be explained in words.

All features are computed on the RGB image scaled to fit WORK_SIZE (so sharpness does not depend on
the resolution the photo arrived in) and returned in `FEATURE_NAMES` order. Lab values are CIE
L*a*b* (D65) divided by 100, so every feature is of order one.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

from stylestream.schemas.tables import FEATURE_NAMES

# Global colour, tone and composition statistics change little below this size, and every feature
# costs about a quarter of what it would at 256 (features are most of ingestion's per-photo time).
WORK_SIZE = 128
PALETTE_SIZE = 3
PALETTE_WORK_SIZE = 32  # three dominant colours need even fewer pixels
# Tonal extremes: where two libraries share a mean and spread of lightness, these tell a soft mid-tone
# look from one split between deep shadows and bright highlights.
HIGHLIGHT_L, SHADOW_L = 80.0, 20.0


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """Linear-light values of sRGB values in [0, 1] (the sRGB transfer curve inverted)."""
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


# The curve for the 256 levels of an 8-bit image: a table look-up instead of a power per pixel.
_LINEAR_U8 = srgb_to_linear(np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float32)
_XYZ_FROM_LINEAR = np.array([[0.4124564, 0.3575761, 0.1804375],
                             [0.2126729, 0.7151522, 0.0721750],
                             [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def linear_to_lab(lin: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of an (..., 3) linear-light RGB array."""
    m = (_XYZ_FROM_LINEAR.T / _D65_WHITE[None, :]).astype(lin.dtype)
    xyz = lin @ m
    f = np.cbrt(xyz)
    dark = xyz <= (6 / 29) ** 3
    f[dark] = xyz[dark] / (3 * (6 / 29) ** 2) + 4 / 29
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of an (..., 3) sRGB array in [0, 1]."""
    return linear_to_lab(srgb_to_linear(rgb))


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """The inverse of `srgb_to_lab`, clipped to [0, 1] (for drawing palettes)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _D65_WHITE
    lin = np.clip(xyz @ np.linalg.inv(_XYZ_FROM_LINEAR).T, 0, 1)
    return np.clip(np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055), 0, 1)


def channel_rows(image: np.ndarray) -> np.ndarray:
    """An (h, w, 3) array as (3, h*w), each channel contiguous: per-channel statistics run far faster."""
    return np.ascontiguousarray(np.moveaxis(image, -1, 0)).reshape(3, -1)


def brightness(lab: np.ndarray) -> float:
    """Mean lightness L*, scaled to [0, 1]."""
    return float(lab[..., 0].mean() / 100)


def contrast(lab: np.ndarray) -> float:
    """RMS contrast: standard deviation of lightness L*, divided by 100."""
    return float(lab[..., 0].std() / 100)


def highlights(lab: np.ndarray) -> float:
    """Share of pixels with lightness L* above HIGHLIGHT_L (high-key, airy looks)."""
    return float((lab[..., 0] > HIGHLIGHT_L).mean())


def shadows(lab: np.ndarray) -> float:
    """Share of pixels with lightness L* below SHADOW_L (low-key, crushed blacks)."""
    return float((lab[..., 0] < SHADOW_L).mean())


def saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation, (max - min) / max per pixel, in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    return float(((mx - mn) / np.maximum(mx, 1e-6)).mean())  # 0 where mx == 0, since then mn == 0


def warmth(lab: np.ndarray) -> float:
    """Mean b* (yellow minus blue) plus half of mean a* (red minus green), divided by 100: > 0 is warm."""
    return float((lab[..., 2].mean() + 0.5 * lab[..., 1].mean()) / 100)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Süsstrunk (2003) colourfulness on 0-255 RGB, divided by 100."""
    r, g, b = (rgb[..., i] * 255 for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float((np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())) / 100)


def sharpness(gray: np.ndarray) -> float:
    """Log of the variance of the 4-neighbour Laplacian of grey levels (0-255), divided by 10."""
    g = gray * 255
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(np.log1p(lap.var()) / 10)


def thirds_energy(lab: np.ndarray) -> float:
    """How much of the image's salient content sits on the rule-of-thirds intersections.

    Saliency is each pixel's Lab distance from the median colour (the background, for most photos).
    The score is the saliency-weighted mean of Gaussian windows (sigma = 1/12 of the size) centred on
    the four intersections, divided by the windows' plain mean: 1 for evenly spread content, above 1
    when subjects sit on the thirds.
    """
    saliency = np.linalg.norm(lab - np.median(channel_rows(lab), axis=1), axis=-1)
    windows = _thirds_windows(*lab.shape[:2])
    total = saliency.sum()
    if total <= 1e-9:
        return 1.0
    return float((saliency * windows).sum() / total)


@cache
def _thirds_windows(h: int, w: int) -> np.ndarray:
    """The four Gaussian windows summed, divided by their mean (computed once per image shape)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    windows = sum(np.exp(-(((xx - w * fx) / (w / 12)) ** 2 + ((yy - h * fy) / (h / 12)) ** 2) / 2)
                  for fx in (1 / 3, 2 / 3) for fy in (1 / 3, 2 / 3))
    return (windows / windows.mean()).astype(np.float32)


def symmetry(lab: np.ndarray) -> float:
    """Left-right symmetry: correlation of lightness with its mirror image, in [-1, 1]."""
    light = lab[..., 0]
    a, b = light - light.mean(), light[:, ::-1] - light.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 1e-9 else 1.0


def palette(image: Image.Image, k: int = PALETTE_SIZE) -> np.ndarray:
    """The k dominant colours (median cut), most frequent first, as Lab / 100: shape (k, 3).

    An image with fewer distinct colours repeats its last one.
    """
    image = image.copy()
    image.thumbnail((PALETTE_WORK_SIZE, PALETTE_WORK_SIZE), Image.Resampling.BILINEAR)
    quantized = image.quantize(colors=k, method=Image.Quantize.MEDIANCUT)
    colours = sorted(quantized.getcolors(k) or [], key=lambda c: (-c[0], c[1]))
    pal = quantized.getpalette()[: 3 * k]
    rgb = [pal[3 * idx: 3 * idx + 3] for _, idx in colours]
    rgb += [rgb[-1]] * (k - len(rgb))
    return srgb_to_lab(np.array(rgb, float) / 255.0) / 100


def aesthetic_features(image: Image.Image) -> np.ndarray:
    """The feature vector of an RGB image, in FEATURE_NAMES order (float32)."""
    small = image.convert("RGB")
    # reducing_gap=1: box-average by an integer factor first, then a small bilinear step; much
    # cheaper than one antialiased bilinear resize from the decoded size.
    small.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR, reducing_gap=1.0)
    levels = np.asarray(small)
    rgb = levels.astype(np.float32) / np.float32(255.0)
    lab = linear_to_lab(_LINEAR_U8[levels])
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    spread = channel_rows(lab).std(1) / 100
    values = {
        "brightness": brightness(lab),
        "contrast": contrast(lab),
        "highlights": highlights(lab),
        "shadows": shadows(lab),
        "saturation": saturation(rgb),
        "warmth": warmth(lab),
        "colourfulness": colourfulness(rgb),
        "sharpness": sharpness(gray),
        "lab_a_mean": float(lab[..., 1].mean() / 100),
        "lab_b_mean": float(lab[..., 2].mean() / 100),
        "lab_a_spread": float(spread[1]),
        "lab_b_spread": float(spread[2]),
        "thirds_energy": thirds_energy(lab[::2, ::2]),  # composition needs no fine detail
        "symmetry": symmetry(lab),
    }
    for i, (l_, a, b) in enumerate(palette(small), start=1):
        values |= {f"palette{i}_l": l_, f"palette{i}_a": a, f"palette{i}_b": b}
    return np.array([values[n] for n in FEATURE_NAMES], dtype=np.float32)



# Words for where a style sits on a feature: (feature, word above, threshold, word below, threshold).
# Thresholds fall between the synthetic looks (demo/synthetic.py): warmth is +0.71 for "warm and
# saturated", -0.11 for "cool and muted", 0.00 for "high-contrast monochrome".
LEVEL_WORDS = (
    ("warmth", "warm", 0.15, "cool", -0.05),
    ("saturation", "saturated", 0.6, "muted", 0.3),
    ("brightness", "light", 0.7, "dark", 0.3),
    ("contrast", "high-contrast", 0.2, "flat", 0.04),
)
MONOCHROME_BELOW = 0.06  # colourfulness under which hue and saturation words say nothing


def describe(features: np.ndarray) -> str:
    """A style's look in words ("warm, saturated"), from its features in FEATURE_NAMES order."""
    def value(name: str) -> float:
        return float(features[FEATURE_NAMES.index(name)])

    mono = value("colourfulness") < MONOCHROME_BELOW
    words = ["monochrome"] if mono else []
    for name, above, high, below, low in LEVEL_WORDS:
        if mono and name in ("warmth", "saturation"):
            continue
        if value(name) > high:
            words.append(above)
        elif value(name) < low:
            words.append(below)
    return ", ".join(words) or "neutral"
