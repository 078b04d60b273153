"""Style manifests: what a style version was computed from, and its style code.

A version's manifest lists the photos that count (id, sha256 of the file, weight) and its basis (the
embedding model and its weights, the half-life, the preprocessing); its style code is the hash of
those two alone, so the same photos under the same recipe give the same code, whatever the version
number, the runner or the order the events came in. With the manifest and their own copies of the
photos anyone can recompute the vector (`stylestream verify`, cli/privacy.py), and see that a
withdrawn photo is not in the set. The explanation (which photos pull the style where) comes from the
same stored contributions.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import numpy as np

from stylestream.models.clip import ClipSpec, weights_id
from stylestream.schemas.events import (
    DeviceBasis,
    Explanation,
    FacetPulls,
    FeaturePulls,
    ManifestPhoto,
    Pull,
    StyleBasis,
    StyleManifest,
    StyleVectorUpdated,
)
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.facets import Facet
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.style import StoredContribution, StyleStats

CODE_PREFIX = "sc1-"
TOP_PHOTOS = 3  # photos named per direction in an explanation
# The features a person can read in words (the palette entries are shown as swatches, not explained).
EXPLAINED_FEATURES = tuple(n for n in FEATURE_NAMES if not n.startswith("palette"))
EXPLAINED_COLUMNS = [FEATURE_NAMES.index(n) for n in EXPLAINED_FEATURES]  # their places in a feature vector


def style_basis(clip: ClipSpec, half_life_days: float, limits: DecodeLimits) -> StyleBasis:
    """The basis of every version ingestion configured so computes."""
    return StyleBasis(**device_basis(clip, limits).model_dump(), half_life_days=half_life_days)


def device_basis(clip: ClipSpec, limits: DecodeLimits) -> DeviceBasis:
    """The part of the basis that touches pixels: what a device must compute with for its
    contributions to count in a state configured so."""
    return DeviceBasis(model=clip.model, weights=weights_id(clip), preprocessing=limits.preprocessing)


def canonical_json(value: object) -> bytes:
    """One byte string per value: sorted keys, no spaces, floats as Python's shortest repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def style_code(basis: StyleBasis, photos: list[ManifestPhoto]) -> str:
    """The code of a set of photos under a basis: sha256 over both, canonically written (160 bits kept)."""
    rows = sorted([p.photo_id, p.sha256, p.weight] for p in photos)
    digest = hashlib.sha256(canonical_json({"basis": basis.model_dump(), "photos": rows})).hexdigest()
    return CODE_PREFIX + digest[:40]


def manifest_photos(stored: dict[str, StoredContribution]) -> list[ManifestPhoto]:
    return [ManifestPhoto(photo_id=p, sha256=c.sha256, weight=c.weight, album_id=c.album_id,
                          computed_on="device" if c.on_device else "server") for p, c in sorted(stored.items())]


def _top(ids: list[str], albums: list[str | None], pulls: np.ndarray, sign: float) -> list[list[Pull]]:
    """Per column of `pulls` (photos x parts), the (at most TOP_PHOTOS) photos with the largest pull in
    direction `sign`, ties by photo id (`ids` are sorted, and the sort is stable). One sort and one
    conversion to Python floats for all columns: a version's explanation is on ingestion's hot path."""
    signed = sign * pulls
    order = np.argsort(-signed, axis=0, kind="stable")[:TOP_PHOTOS].T.tolist()
    return [[Pull(photo_id=ids[i], album_id=albums[i], pull=round(values[i], 6)) for i in rows if ahead[i]]
            for rows, values, ahead in zip(order, pulls.T.tolist(), (signed > 0).T.tolist(), strict=True)]


def explain(stored: dict[str, StoredContribution], stats: StyleStats, facets: list[Facet]) -> Explanation:
    """Which photos pull the style where. A photo's pull on a feature is its weighted share of the
    mean's deviation, w_i (x_i - mean) / sum(w); on the overall embedding (or a facet's), its weighted
    share of the cosine similarity to it."""
    ids = sorted(stored)
    if not ids:
        return Explanation(overall=[], features={}, facets=[])
    albums = [stored[p].album_id for p in ids]
    w = np.array([stored[p].weight for p in ids])
    emb = np.array([stored[p].embedding for p in ids], np.float64)
    feat = np.array([stored[p].features for p in ids], np.float64)
    style_emb, style_feat = stats.vector()
    total = w.sum()
    pulls = w[:, None] * (feat[:, EXPLAINED_COLUMNS] - style_feat[EXPLAINED_COLUMNS]) / total
    features = {name: FeaturePulls(raises=raises, lowers=lowers) for name, raises, lowers in zip(
        EXPLAINED_FEATURES, _top(ids, albums, pulls, 1.0), _top(ids, albums, pulls, -1.0), strict=True)}
    facet_pulls = []
    index = {p: i for i, p in enumerate(ids)}
    for f in facets:
        rows = sorted(index[p] for p in f.photo_ids)
        pull = w[rows] * (emb[rows] @ f.stats.vector()[0]) / w[rows].sum()
        facet_pulls.append(FacetPulls(photo_count=len(rows), typical=_top(
            [ids[i] for i in rows], [albums[i] for i in rows], pull[:, None], 1.0)[0]))
    overall = _top(ids, albums, (w * (emb @ style_emb) / total)[:, None], 1.0)[0]
    return Explanation(overall=overall, features=features, facets=facet_pulls)


def style_manifest(basis: StyleBasis, photos: list[ManifestPhoto], stored: dict[str, StoredContribution],
                   stats: StyleStats, facets: list[Facet], vector: StyleVectorUpdated, now: datetime) -> StyleManifest:
    """The manifest of the version `vector` publishes (its code computed from `basis` and `photos`, the
    `manifest_photos` of `stored`: every contribution that counts in it)."""
    return StyleManifest(
        event_id=f"{vector.user_id}:v{vector.version}:manifest", user_id=vector.user_id, event_time=now,
        version=vector.version, style_code=vector.style_code, basis=basis, photos=photos,
        embedding=vector.embedding, embedding_norm=mean_norm(stats), features=vector.features,
        explanation=explain(stored, stats, facets))


def mean_norm(stats: StyleStats) -> float:
    """|m|: the norm of the weighted mean embedding, before normalization."""
    return float(np.linalg.norm(stats.sum_embedding / stats.total_weight)) if stats.total_weight > 0 else 0.0
