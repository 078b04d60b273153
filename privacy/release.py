"""Releasing a style vector outside the service with a privacy budget (`stylestream style export`).

The released vector is the published, L2-normalized style embedding u = m / |m| (m: the weighted mean
of the photos' unit embeddings) plus Gaussian noise. Sensitivity per photo: removing a photo of
weight w moves m by w |x - m'| / W <= 2 w / (W - w) (W: the total weight, m': the mean without it),
and so u by at most 4 w / ((W - w) |m|); the largest such bound over the person's photos (at most 2,
the sphere's diameter) is the sensitivity used. It is computed from the person's own photos (the
version's manifest) and is not released; strictly, a bound computed from the data protects people
whose neighbouring libraries share it (a smooth-sensitivity caveat the README states).

The noise multiplier for a target epsilon is calibrated with dp-accounting at one fixed delta
(BUDGET_DELTA), and every release to a person is recorded in a small ledger (SQLite, beside the
state; forgetting the person deletes their rows); a release is refused when the composition of all
of them, by dp-accounting's RDP accountant at that delta, would pass the person's budget.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stylestream.schemas.events import StyleVectorUpdated

LEDGER_FILE = "releases.sqlite"
BUDGET_DELTA = 1e-6  # one delta for every release and budget: a caller choosing it could spend more


class BudgetExceeded(ValueError):
    pass


def sensitivity(weights: Sequence[float], mean_norm: float) -> float:
    """The L2 sensitivity per photo of the normalized style embedding (see the module's docstring)."""
    w = np.asarray(weights, np.float64)
    rest = w.sum() - w.max()
    if len(w) < 2 or mean_norm <= 0 or rest <= 0:
        return 2.0
    return float(min(2.0, 4.0 * w.max() / (rest * mean_norm)))


def noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian noise multiplier (sigma / sensitivity) of one release at (epsilon, delta)."""
    import dp_accounting  # here: ingestion imports this module (to forget) and needs no accountant

    return float(dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant, dp_accounting.GaussianDpEvent, epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e4)))


def spent(multipliers: Sequence[float], delta: float) -> float:
    """The epsilon of all these Gaussian releases together, at delta (RDP composition)."""
    if not multipliers:
        return 0.0
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


def noisy(embedding: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The embedding with Gaussian noise of this sigma, normalized again (post-processing)."""
    out = embedding + rng.normal(0.0, sigma, embedding.shape)
    return out / max(np.linalg.norm(out), 1e-12)


class Ledger:
    """Each person's releases (noise multipliers, at BUDGET_DELTA), to compose their budget."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LEDGER_FILE
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS releases (user_id TEXT NOT NULL, released_at TEXT NOT NULL, "
                       "noise_multiplier REAL NOT NULL, epsilon REAL NOT NULL)")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection holding the ledger's write lock from the start: a budget check and the release
        it allows are one transaction, whoever else releases at the same time."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def charge(self, user_id: str, multiplier: float, epsilon: float, budget: float) -> tuple[int, float]:
        """Record a release if the person's releases with it stay within `budget`; returns (releases,
        epsilon spent in all). BudgetExceeded otherwise, recording nothing."""
        with self._db() as db:
            before = [z for (z,) in db.execute("SELECT noise_multiplier FROM releases WHERE user_id = ?", [user_id])]
            total = spent([*before, multiplier], BUDGET_DELTA)
            if total > budget:
                raise BudgetExceeded(f"this release would bring {user_id}'s privacy loss to epsilon {total:.3f} "
                                     f"(delta {BUDGET_DELTA:g}) over {len(before) + 1} releases, past the budget "
                                     f"of {budget}")
            db.execute("INSERT INTO releases VALUES (?, ?, ?, ?)",
                       [user_id, datetime.now(UTC).isoformat(), multiplier, epsilon])
        return len(before) + 1, total

    def count(self, user_id: str) -> int:
        """How many releases of the person the ledger holds."""
        with self._db() as db:
            return db.execute("SELECT count(*) FROM releases WHERE user_id = ?", [user_id]).fetchone()[0]

    def forget(self, user_ids: list[str]) -> int:
        """Delete these people's releases, then rewrite the file so no deleted bytes remain."""
        with self._db() as db:
            n = sum(db.execute("DELETE FROM releases WHERE user_id = ?", [u]).rowcount for u in user_ids)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("VACUUM")
        finally:
            db.close()
        return n


@dataclass(frozen=True)
class Release:
    """A released style: the noisy embedding and the privacy it cost."""

    user_id: str
    version: int
    style_code: str | None
    embedding: list[float]
    epsilon: float
    delta: float
    releases: int  # to this person, this one included
    epsilon_spent_total: float
    budget: float


def release(style: StyleVectorUpdated, weights: Sequence[float], mean_norm: float, epsilon: float, budget: float,
            ledger: Ledger, rng: np.random.Generator | None = None) -> Release:
    """The noisy release of a style, charged to its person's budget (BudgetExceeded if it would pass)."""
    z = noise_multiplier(epsilon, BUDGET_DELTA)
    releases, total = ledger.charge(style.user_id, z, epsilon, budget)
    sigma = z * sensitivity(weights, mean_norm)
    vector = noisy(np.asarray(style.embedding, np.float64), sigma, rng or np.random.default_rng())
    return Release(style.user_id, style.version, style.style_code, [round(float(v), 7) for v in vector],
                   epsilon, BUDGET_DELTA, releases, total, budget)
