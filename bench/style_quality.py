#!/usr/bin/env python
"""Does the style vector capture taste? A synthetic population with known look families.

Every user draws their photos from one look family (colour, contrast, texture) with content that
varies photo to photo; some users mix two families. The photos go through the same functions the
ingestion pipeline uses (decode, aesthetic features, the open_clip RunInference handler, time-decayed
statistics, facets) and then:
  nn_accuracy    share of single-look users whose nearest other user (by style vector) has their look
  facet_purity   for mixed-taste users: share of photos in a facet whose majority look is their own
Final line: one JSON object. Targets: nn_accuracy >= 0.95, facet_purity >= 0.9 (with the tiny CLIP
trained on captioned synthetic photos, models/tiny_style.py, by default).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from tqdm import tqdm

from stylestream.defaults import HALF_LIFE_DAYS, TINY_CLIP
from stylestream.demo.synthetic import LOOKS, make_library
from stylestream.models.clip import clip_spec
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.facets import clustering_space, find_facets
from stylestream.transforms.features import aesthetic_features
from stylestream.transforms.images import DecodeLimits, decode
from stylestream.transforms.style import StyleStats, photo_weight


def population(work: Path, users_per_look: int, photos: int, mixed_users: int, seed: int,
               handler: OpenClipImageHandler) -> dict[str, list]:
    """user -> [(photo, embedding, features)]: single-look users named <look>-<i>, mixed ones mixed-<i>,
    their photos decoded, embedded and measured as ingestion does."""
    model = handler.load_model()
    rng = np.random.default_rng(seed)
    looks = sorted(LOOKS)
    users: dict[str, list[tuple[str, str, int]]] = {}
    for look in looks:
        for i in range(users_per_look):
            users[f"{look}-{i}"] = [("all", look, photos)]
    for i in range(mixed_users):
        x, y = rng.choice(looks, 2, replace=False)
        users[f"mixed-{i}"] = [("a", str(x), photos // 2 + 2), ("b", str(y), photos // 2 + 2)]
    made = make_library(work / "library", users, seed=seed)
    by_user: dict[str, list] = {}
    for p in tqdm(made, desc="decode, features, embed", unit="photo"):
        image, _ = decode(p.path.read_bytes(), DecodeLimits())
        [emb] = handler.run_inference([image], model)
        by_user.setdefault(p.user_id, []).append((p, emb.inference, aesthetic_features(image)))
    return by_user


def single_look_styles(by_user: dict[str, list]) -> tuple[list[str], list[StyleStats]]:
    """The single-look users and the sums behind each one's style."""
    single = sorted(u for u in by_user if not u.startswith("mixed"))
    out = []
    for u in single:
        stats = StyleStats.zero(len(by_user[u][0][1]), len(by_user[u][0][2]))
        for p, e, f in by_user[u]:
            stats = stats + StyleStats.of(e, f, photo_weight(p.taken_at, HALF_LIFE_DAYS))
        out.append(stats)
    return single, out


def nn_accuracy(users: list[str], embeddings: np.ndarray, features: np.ndarray | None) -> float:
    """Share of users whose nearest other user (in the style space; embedding only without features)
    has their look."""
    space = clustering_space(embeddings, features) if features is not None else embeddings
    d = ((space[:, None] - space[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    family = [u.split("-")[0] for u in users]
    return float(np.mean([family[i] == family[int(np.argmin(d[i]))] for i in range(len(users))]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users-per-look", type=int, default=8)
    ap.add_argument("--photos", type=int, default=12, help="photos per single-look user")
    ap.add_argument("--mixed-users", type=int, default=12)
    ap.add_argument("--clip-model", default=TINY_CLIP)
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="style-quality-"))
    spec = clip_spec(work / "models", a.clip_model, a.clip_pretrained)
    handler = OpenClipImageHandler(spec)
    by_user = population(work, a.users_per_look, a.photos, a.mixed_users, a.seed, handler)
    single, styles = single_look_styles(by_user)
    vectors = [s.vector() for s in styles]
    accuracy = nn_accuracy(single, np.stack([v[0] for v in vectors]), np.stack([v[1] for v in vectors]))

    right = total = 0
    n_facets = []
    for u in sorted(u for u in by_user if u.startswith("mixed")):
        rows = by_user[u]
        facets = find_facets([p.photo_id for p, _, _ in rows], np.stack([e for _, e, _ in rows]),
                             np.stack([f for _, _, f in rows]),
                             np.array([photo_weight(p.taken_at, HALF_LIFE_DAYS) for p, _, _ in rows]))
        look_of = {p.photo_id: p.look for p, _, _ in rows}
        n_facets.append(len(facets))
        for f in facets:
            members = [look_of[i] for i in f.photo_ids]
            right += max(members.count(x) for x in set(members))
            total += len(members)
    print(json.dumps({
        "bench": "style_quality", "clip_model": spec.model, "pretrained": spec.pretrained,
        "looks": len(LOOKS), "single_look_users": len(single), "mixed_users": a.mixed_users,
        "photos": sum(len(v) for v in by_user.values()), "nn_accuracy": round(accuracy, 4),
        "facet_purity": round(right / max(total, 1), 4), "mixed_users_with_2_facets": n_facets.count(2),
        "seconds": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
