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
from stylestream.transforms.style import ConsentRecord, is_excluded, scope_key


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


def albums(photos: list[dict], consent: dict[str, ConsentRecord]) -> dict:
    """The person's albums with their photo counts (how many analysed on their device) and switches
    (on unless switched off)."""
    counts: dict[str | None, int] = {}
    on_device: dict[str | None, int] = {}
    for p in photos:
        counts[p["album_id"]] = counts.get(p["album_id"], 0) + 1
        on_device[p["album_id"]] = on_device.get(p["album_id"], 0) + bool(p["on_device"])
    return {"learning": _on(consent, scope_key("user")),
            "albums": [{"album_id": a, "photo_count": n, "on_device": on_device[a],
                        "learning": a is None or _on(consent, scope_key("album", a))}
                       for a, n in sorted(counts.items(), key=lambda kv: kv[0] or "")]}


def photos(rows: list[dict], consent: dict[str, ConsentRecord]) -> list[dict]:
    """Each photo with whether it counts (ingestion's own rule, `transforms.style.is_excluded`) and
    whether it was analysed on the person's device (never sent to the server)."""
    return [{**p, "on_device": bool(p["on_device"]),
             "learning": not is_excluded(consent, p["photo_id"], p["album_id"])} for p in rows]


def _on(consent: dict[str, ConsentRecord], key: str) -> bool:
    return key not in consent or consent[key].enabled
