"""What the person's endpoints show, computed from the API's read model and the Parquet history:
pure functions of stored events, so the page, the API and the download say the same thing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stylestream.analytics import drift
from stylestream.analytics.plot import palette_rgb
from stylestream.analytics.pseudonyms import load_key, pseudonym
from stylestream.pipelines.layout import StateLayout
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.features import describe


def _hex(rgb: np.ndarray) -> str:
    r, g, b = (round(float(c) * 255) for c in np.clip(rgb, 0, 1))
    return f"#{r:02x}{g:02x}{b:02x}"


def palette(features: list[float]) -> list[str]:
    """A style's three dominant colours as #rrggbb."""
    return [_hex(c) for c in palette_rgb(np.asarray([features], dtype=float))[:, 0]]


def look(features_by_name: dict[str, float]) -> dict:
    vector = np.array([features_by_name.get(n, 0.0) for n in FEATURE_NAMES])
    return {"words": describe(vector), "palette": palette(vector.tolist())}


def style(event: dict) -> dict:
    """The latest style_vector_updated event of a person, as the page shows it."""
    return {
        "version": event["version"], "style_code": event.get("style_code"), "updated_at": event["event_time"],
        "photo_count": event["photo_count"], **look(event["features"]),
        "features": {n: round(v, 4) for n, v in event["features"].items()},
        "facets": [{"index": i, "photo_count": f["photo_count"], "weight_share": round(f["weight_share"], 3),
                    **look(f["features"])} for i, f in enumerate(event.get("facets", []))],
    }


def history(state: StateLayout, user_id: str) -> list[dict]:
    """Each version of the person's style over time, with its drift, words and palette (none before
    ingestion has written history)."""
    if not state.analytics_key.exists() or not any(Path(state.history).glob("date=*/*.parquet")):
        return []
    db = drift.connect(state.history)
    try:
        rows = drift.timeline(db, pseudonym(user_id, load_key(state.analytics_key))).to_pylist()
    finally:
        db.close()
    return [{"version": r["version"], "updated_at": r["updated_at"].isoformat(), "photo_count": r["photo_count"],
             "drift_from_first": round(r["drift_from_first"], 5),
             "drift_from_previous": round(r["drift_from_previous"], 5),
             **look(dict(zip(FEATURE_NAMES, r["features"], strict=True)))} for r in rows]


def albums(photos: list[dict], switches: dict[tuple[str, str], bool]) -> dict:
    """The person's albums with their photo counts and switches (on unless switched off)."""
    counts: dict[str, int] = {}
    for p in photos:
        counts[p["album_id"] or ""] = counts.get(p["album_id"] or "", 0) + 1
    return {"learning": switches.get(("user", ""), True),
            "albums": [{"album_id": a or None, "photo_count": n, "learning": switches.get(("album", a), True)}
                       for a, n in sorted(counts.items())]}


def photos(rows: list[dict], switches: dict[tuple[str, str], bool]) -> list[dict]:
    user_on = switches.get(("user", ""), True)
    return [{**p, "learning": user_on and switches.get(("album", p["album_id"] or ""), True)
             and switches.get(("photo", p["photo_id"]), True)} for p in rows]
