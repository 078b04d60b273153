"""One picture of a user's style over time: drift, feature trends and palette swatches."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa

from stylestream.analytics.drift import FEATURE_WORDS
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.features import lab_to_srgb

PALETTE = [[FEATURE_NAMES.index(f"palette{i}_{c}") for c in "lab"] for i in (1, 2, 3)]


def palette_rgb(features: np.ndarray) -> np.ndarray:
    """(versions, 24) features -> (3 colours, versions, 3) sRGB in [0, 1]."""
    lab = np.stack([features[:, idx] for idx in PALETTE]) * 100  # stored as Lab / 100
    return lab_to_srgb(lab)


def plot_timeline(timeline: pa.Table, user: str, path: Path) -> Path:
    """Three panels sharing the time axis: drift from the first and the previous version, the
    interpretable features with words, and each version's three dominant colours."""
    if timeline.num_rows == 0:
        raise ValueError(f"user {user!r} has no versions to plot")
    t = timeline.column("updated_at").to_pylist()
    features = np.array(timeline.column("features").to_pylist(), dtype=float)
    fig, (drift_ax, feat_ax, pal_ax) = plt.subplots(
        3, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [2, 3, 1]})
    drift_ax.plot(t, timeline.column("drift_from_first").to_pylist(), marker="o", label="from the first version")
    drift_ax.plot(t, timeline.column("drift_from_previous").to_pylist(), marker=".", linestyle="--",
                  label="from the previous version")
    drift_ax.set_ylabel("cosine distance")
    drift_ax.set_title(f"Style of {user}: {timeline.num_rows} versions")
    drift_ax.legend(loc="upper left")
    for w in FEATURE_WORDS:
        values = features[:, FEATURE_NAMES.index(w.feature)]
        feat_ax.plot(t, values - values[0], marker=".", label=f"{w.feature} (+ {w.more}, - {w.less})")
    feat_ax.axhline(0, color="grey", linewidth=0.5)
    feat_ax.set_ylabel("change since the first version")
    feat_ax.legend(loc="upper left", fontsize="small", ncol=2)
    colours = palette_rgb(features)
    times = matplotlib.dates.date2num(t)
    last = np.median(np.diff(times)) if len(times) > 1 else 1 / 24  # a lone version: an hour wide
    widths = np.diff(times, append=times[-1] + last)
    for row in range(3):  # dominant colour on top
        pal_ax.bar(times, 1, width=widths, bottom=2 - row, color=colours[row], align="edge", edgecolor="white")
    pal_ax.set_yticks([0.5, 1.5, 2.5], ["3rd", "2nd", "1st"])
    pal_ax.set_ylabel("palette")
    pal_ax.xaxis_date()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
