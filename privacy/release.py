"""Releasing a style vector outside the service with a privacy budget (`stylestream style export`).

The released vector is the published, L2-normalized style embedding u = m / |m| (m: the weighted mean
of the photos' unit embeddings) plus Gaussian noise. Sensitivity per photo: adding or removing one
photo of weight w moves m by at most 2 w / W (W: the total weight), and so u by at most
4 w / (W |m|); the largest such bound over the person's photos (capped at 2, the diameter of the
sphere) is the stated sensitivity. It depends on the person's own photos, as it must for a weighted
mean, so it is computed from the manifest of the version released and stated with the release.

The noise multiplier for a target (epsilon, delta) is calibrated with dp-accounting, and every release
to a person is recorded in a small ledger (SQLite, beside the state; forgetting the person deletes
their rows); a release is refused when the composition of all of them, by dp-accounting's RDP
accountant, would pass the person's budget.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import dp_accounting
import numpy as np

from stylestream.schemas.events import StyleVectorUpdated

LEDGER_FILE = "releases.sqlite"


class BudgetExceeded(ValueError):
    pass


def sensitivity(weights: Sequence[float], mean_norm: float) -> float:
    """The L2 sensitivity per photo of the normalized style embedding (see the module's docstring)."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or mean_norm <= 0:
        return 2.0
    return float(min(2.0, 4.0 * w.max() / (w.sum() * mean_norm)))


def noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian noise multiplier (sigma / sensitivity) of one release at (epsilon, delta)."""
    return float(dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant, dp_accounting.GaussianDpEvent, epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e4)))


def spent(multipliers: Sequence[float], delta: float) -> float:
    """The epsilon of all these Gaussian releases together, at delta (RDP composition)."""
    if not multipliers:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


def noisy(embedding: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The embedding with Gaussian noise of this sigma, normalized again (post-processing)."""
    out = embedding + rng.normal(0.0, sigma, embedding.shape)
    return out / max(np.linalg.norm(out), 1e-12)


class Ledger:
    """Each person's releases: (noise multiplier, delta) per release, to compose their budget."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LEDGER_FILE
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS releases (user_id TEXT NOT NULL, released_at TEXT NOT NULL, "
                       "noise_multiplier REAL NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def multipliers(self, user_id: str) -> list[float]:
        with self._db() as db:
            return [z for (z,) in db.execute("SELECT noise_multiplier FROM releases WHERE user_id = ?", [user_id])]

    def record(self, user_id: str, multiplier: float, epsilon: float, delta: float) -> None:
        with self._db() as db:
            db.execute("INSERT INTO releases VALUES (?, ?, ?, ?, ?)",
                       [user_id, datetime.now(UTC).isoformat(), multiplier, epsilon, delta])

    def forget(self, user_ids: list[str]) -> int:
        """Delete these people's releases; then rewrite the file so no deleted bytes remain."""
        if not self.path.exists():
            return 0
        with self._db() as db:
            n = sum(db.execute("DELETE FROM releases WHERE user_id = ?", [u]).rowcount for u in user_ids)
        db = self._db()
        try:
            db.execute("VACUUM")
        finally:
            db.close()
        return n


def release(style: StyleVectorUpdated, weights: Sequence[float], mean_norm: float, epsilon: float, delta: float,
            budget: float, ledger: Ledger, rng: np.random.Generator | None = None) -> dict:
    """The noisy release of a style, charged to its person's budget (BudgetExceeded if it would pass)."""
    z = noise_multiplier(epsilon, delta)
    before = ledger.multipliers(style.user_id)
    total = spent([*before, z], delta)
    if total > budget:
        raise BudgetExceeded(f"this release would bring {style.user_id}'s privacy loss to epsilon {total:.3f} "
                             f"(delta {delta:g}) over {len(before) + 1} releases, past the budget of {budget}")
    delta_u = sensitivity(weights, mean_norm)
    vector = noisy(np.asarray(style.embedding, np.float64), z * delta_u, rng or np.random.default_rng())
    ledger.record(style.user_id, z, epsilon, delta)
    return {"user_id": style.user_id, "version": style.version, "style_code": style.style_code,
            "embedding": [round(float(v), 7) for v in vector],
            "privacy": {"mechanism": "gaussian", "epsilon": epsilon, "delta": delta, "sensitivity": delta_u,
                        "noise_multiplier": z, "sigma": z * delta_u, "releases": len(before) + 1,
                        "epsilon_spent_total": total, "budget": budget}}
