"""The style-vector event: the one place a new style version becomes what serving and other
consumers read from the style-vectors topic (the local store and the streaming pipeline both call it)."""

from __future__ import annotations

from datetime import datetime

import numpy as np

from stylestream.schemas.events import StyleFacet, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.facets import Facet
from stylestream.transforms.style import StyleStats


def named_features(features: np.ndarray) -> dict[str, float]:
    return {n: float(v) for n, v in zip(FEATURE_NAMES, features, strict=True)}


def style_vector_event(user_id: str, version: int, stats: StyleStats, facets: list[Facet],
                       withdrawn_versions: list[int], style_code: str | None,
                       event_time: datetime) -> StyleVectorUpdated:
    """Version `version` of the user's style, with its facets, its code and the versions it withdraws."""
    embedding, features = stats.vector()
    return StyleVectorUpdated(
        event_id=f"{user_id}:v{version}", user_id=user_id, event_time=event_time, version=version,
        photo_count=stats.count, total_weight=stats.total_weight, embedding=embedding.tolist(),
        features=named_features(features),
        facets=[StyleFacet(photo_count=f.stats.count,
                           weight_share=min(1.0, f.stats.total_weight / stats.total_weight),
                           embedding=f.stats.vector()[0].tolist(), features=named_features(f.stats.vector()[1]))
                for f in facets],
        style_code=style_code, withdrawn_versions=withdrawn_versions)
