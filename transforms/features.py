"""Interpretable aesthetic features of a photo, so style and its drift can be explained in words.

All features are computed on the RGB image scaled to fit WORK_SIZE (so sharpness does not depend on
the resolution the photo arrived in) and returned in `FEATURE_NAMES` order.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from stylestream.schemas.tables import FEATURE_NAMES

WORK_SIZE = 256


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of an (..., 3) sRGB array in [0, 1]."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def brightness(lab: np.ndarray) -> float:
    """Mean lightness L*, scaled to [0, 1]."""
    return float(lab[..., 0].mean() / 100)


def contrast(lab: np.ndarray) -> float:
    """RMS contrast: standard deviation of lightness L*, scaled by 100."""
    return float(lab[..., 0].std() / 100)


def saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation, (max - min) / max per pixel, in [0, 1]."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    return float(np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0).mean())


def warmth(lab: np.ndarray) -> float:
    """Mean b* (yellow minus blue) plus half of mean a* (red minus green), scaled by 100: > 0 is warm."""
    return float((lab[..., 2].mean() + 0.5 * lab[..., 1].mean()) / 100)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Süsstrunk (2003) colourfulness on 0-255 RGB, scaled by 1/100."""
    r, g, b = (rgb[..., i] * 255 for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float((np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())) / 100)


def sharpness(gray: np.ndarray) -> float:
    """Log of the variance of the 4-neighbour Laplacian of grey levels (0-255): higher is sharper."""
    g = gray * 255
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(np.log1p(lap.var()) / 10)


def aesthetic_features(image: Image.Image) -> np.ndarray:
    """The feature vector of an RGB image, in FEATURE_NAMES order (float32)."""
    small = image.convert("RGB")
    small.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR)
    rgb = np.asarray(small, dtype=np.float64) / 255.0
    lab = srgb_to_lab(rgb)
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    values = {
        "brightness": brightness(lab),
        "contrast": contrast(lab),
        "saturation": saturation(rgb),
        "warmth": warmth(lab),
        "colourfulness": colourfulness(rgb),
        "sharpness": sharpness(gray),
        "lab_l_mean": float(lab[..., 0].mean() / 100),
        "lab_a_mean": float(lab[..., 1].mean() / 100),
        "lab_b_mean": float(lab[..., 2].mean() / 100),
    }
    return np.array([values[n] for n in FEATURE_NAMES], dtype=np.float32)
