"""Style facets follow additions and withdrawals, and a prompt picks the facet nearest to it."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from helpers import produce, read_topic

from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.schemas.events import parse_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.generator import choose_facet
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_VECTORS
from stylestream.transforms.facets import COMPOSITION, TASTE_FEATURES, find_facets


def purity(facets, look_of) -> float:
    """Share of photos that sit in a facet whose majority look is their own."""
    right = 0
    for f in facets:
        looks = [look_of[p] for p in f.photo_ids]
        right += max(looks.count(x) for x in set(looks))
    return right / sum(len(f.photo_ids) for f in facets)


def test_mixed_library_splits_into_its_looks_and_follows_a_withdrawal(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("food", "warm", 8), ("street", "mono", 8)],
                                             "ben": [("walks", "cool", 9)]})
    look_of = {p.photo_id: p.look for p in photos}
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    ing = make_ingestor()
    ing.run_until_caught_up()
    from stylestream.pipelines.store import Store
    from stylestream.transforms.facets import facets_of

    with Store(ing.cfg.db_path) as s:
        found = {u: facets_of(stored) for u, stored in s.stored_contributions(["ana", "ben"]).items()}
    ana, ben = found["ana"], found["ben"]
    assert len(ana) == 2 and purity(ana, look_of) >= 0.9
    assert len(ben) == 1  # one look: no split

    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "street", False, datetime(2026, 5, 1, tzinfo=UTC))])
    ing.run_until_caught_up()
    versions = [parse_event(STYLE_VECTORS, m.value) for m in read_topic(bs, STYLE_VECTORS)]
    latest = max((v for v in versions if v.user_id == "ana"), key=lambda v: v.version)
    assert latest.photo_count == 8 and len(latest.facets) == 1
    np.testing.assert_allclose(latest.facets[0].embedding, latest.embedding, atol=1e-6)
    first = min((v for v in versions if v.user_id == "ana"), key=lambda v: v.version)
    assert [f.photo_count for f in first.facets] == [8, 8]
    assert abs(sum(f.weight_share for f in first.facets) - 1) < 1e-6


def test_facets_do_not_depend_on_row_order():
    rng = np.random.default_rng(1)
    emb = np.vstack([rng.normal(1, 0.1, (6, 4)), rng.normal(-1, 0.1, (6, 4))])
    n = len(FEATURE_NAMES)
    feat = np.vstack([rng.normal(0, 0.05, (6, n)), rng.normal(1, 0.05, (6, n))])
    ids, w = [f"p{i:02d}" for i in range(12)], rng.random(12) + 0.5
    perm = rng.permutation(12)
    a = find_facets(ids, emb, feat, w)
    b = find_facets([ids[i] for i in perm], emb[perm], feat[perm], w[perm])
    assert [f.photo_ids for f in a] == [f.photo_ids for f in b] and len(a) == 2


def test_where_the_subject_stands_does_not_split_a_taste():
    """Composition alone bimodal (centred and off-centre photos of one look): one facet. The same
    split in a colour feature: two."""
    rng = np.random.default_rng(2)
    n = len(FEATURE_NAMES)
    emb, feat = rng.normal(0, 0.05, (12, 4)), rng.normal(0.5, 0.01, (12, n))
    ids, w = [f"p{i:02d}" for i in range(12)], np.ones(12)
    assert set(COMPOSITION) <= set(FEATURE_NAMES) and TASTE_FEATURES.sum() == n - len(COMPOSITION)
    centred = feat.copy()
    for name in COMPOSITION:
        centred[:6, FEATURE_NAMES.index(name)] += 0.5
    assert len(find_facets(ids, emb, centred, w)) == 1
    warmer = feat.copy()
    warmer[:6, FEATURE_NAMES.index("warmth")] += 0.5
    assert len(find_facets(ids, emb, warmer, w)) == 2


def test_prompt_chooses_the_nearest_facet():
    facets = [np.array([1.0, 0, 0]), np.array([0, 1.0, 0])]
    assert choose_facet(np.array([0.1, 0.9, 0.0]), facets) == 1
    assert choose_facet(np.array([0.9, 0.1, 0.0]), facets) == 0
    assert choose_facet(np.array([0.9, 0.1, 0.0]), facets[:1]) is None
