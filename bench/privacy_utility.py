#!/usr/bin/env python
"""What a privacy budget costs: style matching on released (noisy) style vectors, at several epsilons,
against the same vectors released without noise, in one run.

The population is bench/style_quality.py's (users drawing their photos from one look family). Each
user's style embedding is released as `stylestream style export` releases it (privacy/release.py:
Gaussian mechanism on the normalized embedding, sensitivity per photo from the user's own weights,
noise multiplier calibrated with dp-accounting's RDP accountant at --delta). Utility is the share of
users whose nearest other user, by released embedding, has their look (nn_accuracy); it is averaged
over --trials noise draws. Chance is 1 / (number of looks).
Final line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # bench/style_quality.py, run beside it

import numpy as np
from style_quality import nn_accuracy, population, single_look_styles

from stylestream.defaults import HALF_LIFE_DAYS, TINY_CLIP
from stylestream.demo.synthetic import LOOKS
from stylestream.models.clip import clip_spec
from stylestream.privacy.release import BUDGET_DELTA, noise_multiplier, noisy, sensitivity
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.manifest import mean_norm
from stylestream.transforms.style import photo_weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users-per-look", type=int, default=8)
    ap.add_argument("--photos", type=int, default=12, help="photos per user")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16, 64, 256])
    ap.add_argument("--delta", type=float, default=BUDGET_DELTA)
    ap.add_argument("--trials", type=int, default=10, help="noise draws per epsilon")
    ap.add_argument("--clip-model", default=TINY_CLIP)
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="privacy-utility-"))
    handler = OpenClipImageHandler(clip_spec(work / "models", a.clip_model, a.clip_pretrained))
    by_user = population(work, a.users_per_look, a.photos, 0, a.seed, handler)
    users, styles = single_look_styles(by_user)
    embeddings = np.stack([s.vector()[0] for s in styles]).astype(np.float64)
    features = np.stack([s.vector()[1] for s in styles])
    deltas = np.array([sensitivity([photo_weight(p.taken_at, HALF_LIFE_DAYS) for p, _, _ in by_user[u]],
                                   mean_norm(s)) for u, s in zip(users, styles, strict=True)])

    rng = np.random.default_rng(a.seed)
    rows = [{"epsilon": "no noise", "sigma_median": 0.0, "nn_accuracy": nn_accuracy(users, embeddings, None)}]
    for eps in a.epsilons:
        z = noise_multiplier(eps, a.delta)
        sigmas = z * deltas
        scores = [nn_accuracy(users, np.stack([noisy(e, s, rng) for e, s in zip(embeddings, sigmas, strict=True)]),
                              None) for _ in range(a.trials)]
        rows.append({"epsilon": eps, "sigma_median": float(np.median(sigmas)), "nn_accuracy": float(np.mean(scores)),
                     "nn_accuracy_sd": float(np.std(scores))})

    print(f"{len(users)} users, {len(LOOKS)} looks (chance {1 / len(LOOKS):.3f}), {a.photos} photos each; "
          f"sensitivity per photo: median {np.median(deltas):.3f}; delta {a.delta:g}; {a.trials} draws each")
    print(f"{'epsilon':>9} {'sigma':>8} {'nn_accuracy':>12} {'vs no noise':>12}")
    base = rows[0]["nn_accuracy"]
    for r in rows:
        eps = r["epsilon"] if isinstance(r["epsilon"], str) else f"{r['epsilon']:g}"
        print(f"{eps:>9} {r['sigma_median']:>8.3f} {r['nn_accuracy']:>12.3f} {r['nn_accuracy'] / base:>12.2f}")
    print(json.dumps({
        "bench": "privacy_utility", "clip_model": a.clip_model, "users": len(users), "looks": len(LOOKS),
        "photos_per_user": a.photos, "delta": a.delta, "trials": a.trials,
        "nn_accuracy_full_vector": nn_accuracy(users, embeddings, features),
        "sensitivity_median": float(np.median(deltas)), "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
