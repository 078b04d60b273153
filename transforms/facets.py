"""Style facets: the few distinct tastes inside one person's library (food photos, street photos...).

Facets are recomputed from the user's stored contributions whenever their style changes, rather than
updated online: a user's contributions are already at hand for that, and recomputing makes facets as
exact and order-free as the overall style (a withdrawn photo leaves no trace in any facet). The
clustering is a weighted k-means with deterministic farthest-point seeding, over the embedding and
the aesthetic features of colour and tone side by side (not composition: where the subject stands
changes from photo to photo within one taste); a further facet is kept only if it explains the
library much better and every facet has enough photos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.style import StoredContribution, StyleStats, stats_of

MAX_FACETS = 3
MIN_FACET_PHOTOS = 3
# Keep k facets only if they leave at most this share of the (k-1)-facet within-cluster spread.
# Tuned on the synthetic looks with the trained tiny CLIP: single-look libraries split no lower than
# ~0.33, two-look ones no higher than ~0.22 (another embedding model may want it tuned again).
SPLIT_GAIN = 0.27
# The interpretable features count four times the embedding in the clustering: they carry the look
# reliably, while a CLIP embedding also follows what each photo shows, which varies within one taste.
FEATURE_WEIGHT = 4.0
# Composition (where the subject stands) changes from one photo to the next within one taste: styles are
# compared on the other features, or a one-look library would split into its centred and off-centre photos.
COMPOSITION = ("thirds_energy", "symmetry")
TASTE_FEATURES = np.isin(FEATURE_NAMES, COMPOSITION, invert=True)
KMEANS_ITERATIONS = 25


@dataclass(frozen=True)
class Facet:
    stats: StyleStats
    photo_ids: tuple[str, ...]


def style_space(embeddings: np.ndarray, features: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A map of (embeddings, features) rows into one space where distances compare styles: each part
    centred and scaled to unit RMS norm over the given rows, so neither dominates by its size alone,
    then the features (TASTE_FEATURES of them) weighted by FEATURE_WEIGHT. Fitted on these rows, applicable
    to others."""
    def scaler(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        mean = x.mean(0)
        rms = np.sqrt(((x - mean) ** 2).sum(1).mean())
        rms = rms if rms > 1e-12 else 1.0
        return lambda y: (y.astype(np.float64) - mean) / rms
    emb, feat = scaler(embeddings.astype(np.float64)), scaler(features[:, TASTE_FEATURES].astype(np.float64))
    return lambda e, f: np.hstack([emb(e), FEATURE_WEIGHT * feat(f[:, TASTE_FEATURES])])


def clustering_space(embeddings: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Rows to cluster: the rows themselves in their `style_space`."""
    return style_space(embeddings, features)(embeddings, features)


def _kmeans(x: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Weighted k-means; returns (labels, weighted within-cluster sum of squares)."""
    centres = [x[int(np.argmax(w))]]  # heaviest photo first, then farthest points: deterministic
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[int(np.argmax(d))])
    c = np.array(centres)
    labels = np.zeros(len(x), int)
    for _ in range(KMEANS_ITERATIONS):
        new = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        if (new == labels).all() and _ > 0:
            break
        labels = new
        for j in range(k):
            m = labels == j
            if m.any():
                c[j] = (w[m, None] * x[m]).sum(0) / w[m].sum()
    sse = float((w * ((x - c[labels]) ** 2).sum(1)).sum())
    return labels, sse


def find_facets(photo_ids: list[str], embeddings: np.ndarray, features: np.ndarray, weights: np.ndarray,
                max_facets: int = MAX_FACETS) -> list[Facet]:
    """The user's facets, largest first; a single facet (the whole library) when it has no clear split."""
    order = np.argsort(photo_ids, kind="stable")  # the result must not depend on row order
    ids = [photo_ids[i] for i in order]
    emb, feat, w = embeddings[order], features[order], weights[order]
    if len(ids) == 0:
        return []
    x = clustering_space(emb, feat)
    labels, sse = np.zeros(len(ids), int), float((w * ((x - np.average(x, 0, w)) ** 2).sum(1)).sum())
    for k in range(2, max_facets + 1):
        if len(ids) < k * MIN_FACET_PHOTOS:
            break
        new_labels, new_sse = _kmeans(x, w, k)
        if np.bincount(new_labels, minlength=k).min() < MIN_FACET_PHOTOS or new_sse > SPLIT_GAIN * sse:
            break
        labels, sse = new_labels, new_sse
    facets = []
    for j in np.unique(labels):
        m = labels == j
        facets.append(Facet(stats_of(emb[m], feat[m], w[m]), tuple(i for i, keep in zip(ids, m, strict=True) if keep)))
    return sorted(facets, key=lambda f: (-f.stats.total_weight, f.photo_ids))


def facets_of(stored: dict[str, StoredContribution]) -> list[Facet]:
    """The facets of a user's stored contributions (photo_id -> contribution)."""
    ids = sorted(stored)
    if not ids:
        return []
    return find_facets(ids, np.array([stored[p].embedding for p in ids], np.float32),
                       np.array([stored[p].features for p in ids], np.float32),
                       np.array([stored[p].weight for p in ids]))
