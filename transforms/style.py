"""Per-user style state: time-decayed sufficient statistics, consent, and exact retraction.

A user's style is sum(w_i * x_i) / sum(w_i) over the photos that currently count, where x_i is a
photo's contribution (embedding, features) and w_i = 2 ** ((taken_at_i - EPOCH) / half_life): a
photo taken one half-life later weighs twice as much. Weighting against a fixed epoch (rather than
"now") makes the statistics a commutative monoid: adding, merging and retracting are exact and
independent of order, and the normalized style equals the one decayed to any reference time.

`plan_user_update` is the whole per-user update rule as a pure function of what is stored for the
user (`UserView`) and what arrived (`UserBatch`); the store applies its result in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from stylestream.schemas.dead_letters import DeadLetter
from stylestream.transforms.records import Contribution, UserBatch

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # photo weights grow by 2 ** (days since EPOCH / half-life)


def photo_weight(taken_at: datetime, half_life_days: float) -> float:
    return float(2.0 ** ((taken_at - EPOCH).total_seconds() / 86400.0 / half_life_days))


@dataclass
class StyleStats:
    """Weighted sums of embeddings and features, total weight and photo count (a commutative monoid)."""

    sum_embedding: np.ndarray  # float64
    sum_features: np.ndarray  # float64
    total_weight: float = 0.0
    count: int = 0

    @classmethod
    def zero(cls, dim: int, n_features: int) -> StyleStats:
        return cls(np.zeros(dim), np.zeros(n_features))

    @classmethod
    def of(cls, embedding: np.ndarray, features: np.ndarray, weight: float) -> StyleStats:
        return cls(weight * embedding.astype(np.float64), weight * features.astype(np.float64), weight, 1)

    def __add__(self, other: StyleStats) -> StyleStats:
        return StyleStats(self.sum_embedding + other.sum_embedding, self.sum_features + other.sum_features,
                          self.total_weight + other.total_weight, self.count + other.count)

    def __sub__(self, other: StyleStats) -> StyleStats:
        out = StyleStats(self.sum_embedding - other.sum_embedding, self.sum_features - other.sum_features,
                         self.total_weight - other.total_weight, self.count - other.count)
        # With nothing left, clear the float residue of the subtractions instead of normalizing it.
        return StyleStats.zero(len(out.sum_embedding), len(out.sum_features)) if out.count == 0 else out

    def vector(self) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalized mean embedding, mean features), float32; zeros when no photo counts."""
        if self.count == 0 or self.total_weight <= 0:
            return (np.zeros(len(self.sum_embedding), np.float32), np.zeros(len(self.sum_features), np.float32))
        mean = self.sum_embedding / self.total_weight
        norm = np.linalg.norm(mean)
        emb = mean / norm if norm > 0 else mean
        return emb.astype(np.float32), (self.sum_features / self.total_weight).astype(np.float32)


def stats_of(embeddings: np.ndarray, features: np.ndarray, weights: np.ndarray) -> StyleStats:
    """The sufficient statistics of photos with these weights, by the rule every user's style follows."""
    stats = StyleStats.zero(embeddings.shape[1], features.shape[1])
    for e, f, w in zip(embeddings, features, weights, strict=True):
        stats = stats + StyleStats.of(e, f, float(w))
    return stats


def style_of(embeddings: np.ndarray, features: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The style vector of photos with these weights."""
    return stats_of(embeddings, features, weights).vector()


@dataclass(frozen=True)
class ConsentRecord:
    enabled: bool
    event_time: datetime
    event_id: str

    def supersedes(self, other: ConsentRecord | None) -> bool:
        """Latest event time wins; the event id breaks ties, so any arrival order agrees."""
        return other is None or (self.event_time, self.event_id) > (other.event_time, other.event_id)


def scope_key(scope: str, scope_id: str | None = None) -> str:
    return f"{scope}:{scope_id or ''}" if scope != "user" else "user:"


def is_excluded(consent: dict[str, ConsentRecord], photo_id: str, album_id: str | None) -> bool:
    """A photo counts only while no scope covering it (user, its album, itself) is switched off."""
    keys = [scope_key("user"), scope_key("photo", photo_id)]
    if album_id is not None:
        keys.append(scope_key("album", album_id))
    return any(k in consent and not consent[k].enabled for k in keys)


@dataclass(frozen=True)
class StoredContribution:
    album_id: str | None
    weight: float
    embedding: np.ndarray
    features: np.ndarray
    added_version: int  # the user's first style version that counted it
    sha256: str | None  # of the photo's file (None for photos stored before manifests existed)
    on_device: bool = False  # computed on the person's device (photo_embedded), not by ingestion


@dataclass
class UserView:
    """What the store holds for one user that a batch can touch."""

    stats: StyleStats
    version: int
    consent: dict[str, ConsentRecord]  # every scope the user has toggled
    stored: dict[str, StoredContribution]  # every stored contribution of the user, by photo_id
    deleted: set[str]  # photo ids of the batch already known as deleted
    catalog: dict[str, str | None] = field(default_factory=dict)  # known, undeleted photos the batch
    # may affect (photo_id -> album_id), counted or not
    forgotten_at: datetime | None = None  # the user asked to be forgotten then: earlier events are void
    files: dict[str, str] = field(default_factory=dict)  # the sha256 of catalogued photos' files, where
    # known (`records.catalogued_sha256`), at least of the photos the batch names

    @classmethod
    def empty(cls, embedding_dim: int, n_features: int) -> UserView:
        """A user the store has never seen."""
        return cls(StyleStats.zero(embedding_dim, n_features), 0, {}, {}, set(), {})


@dataclass
class UserUpdate:
    consent: dict[str, ConsentRecord] = field(default_factory=dict)  # scope key -> new record
    tombstones: dict[str, datetime] = field(default_factory=dict)  # photo_id -> deleted at
    add: list[tuple[Contribution, float]] = field(default_factory=list)  # with its weight
    remove: list[str] = field(default_factory=list)  # photo ids whose contribution is deleted
    catalog: list[Contribution] = field(default_factory=list)  # uploads to remember (by reference)
    reingest: list[str] = field(default_factory=list)  # catalogued photos that count again: embed anew
    refused: list[tuple[Contribution, str]] = field(default_factory=list)  # device contributions, and why
    stats: StyleStats | None = None

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return [c.refused(reason) for c, reason in self.refused]

    @property
    def changes_style(self) -> bool:
        return bool(self.add or self.remove)


def plan_user_update(view: UserView, batch: UserBatch, half_life_days: float) -> UserUpdate:
    """The changes one batch makes to one user's state. Toggles resolve by event time, deletions are
    permanent, and a photo already stored is never added twice, whatever the order. A device's
    contribution naming a photo known with another file (sha256) is refused and changes nothing:
    of two files for one photo id, the first to arrive counts.

    An opt-out deletes the photos' contributions; the photos stay catalogued by reference. When a
    later toggle lets them count again they are listed in `reingest`, to be fetched and embedded
    anew (if the photo service still has them), so the outcome does not depend on arrival order."""
    update = UserUpdate()
    consent = dict(view.consent)
    for t in batch.toggles:
        rec = ConsentRecord(t.enabled, t.event_time, t.event_id)
        key = scope_key(t.scope, t.scope_id)
        if rec.supersedes(consent.get(key)):
            consent[key] = update.consent[key] = rec

    deleted = set(view.deleted)
    for d in batch.deletes:
        update.tombstones[d.photo_id] = max(d.event_time, update.tombstones.get(d.photo_id, d.event_time))
        deleted.add(d.photo_id)

    stats = view.stats
    for photo_id, c in sorted(view.stored.items()):
        if photo_id in deleted or is_excluded(consent, photo_id, c.album_id):
            update.remove.append(photo_id)
            stats = stats - StyleStats.of(c.embedding, c.features, c.weight)

    seen, catalogued = set(view.stored), set(view.catalog)
    files = view.files | {p: s.sha256 for p, s in view.stored.items() if s.sha256}  # what counted wins
    for c in sorted(batch.contributions, key=lambda c: c.arrival):
        if c.photo_id in deleted:
            continue
        known = files.get(c.photo_id)
        if c.on_device and known is not None and known != c.sha256:
            update.refused.append((c, f"photo {c.photo_id} is known with another file (sha256 {known[:12]}…, this "
                                      f"one's {c.sha256[:12]}…): a changed photo needs a photo id of its own"))
            continue
        if c.sha256:
            files.setdefault(c.photo_id, c.sha256)
        if c.photo_id not in catalogued:
            catalogued.add(c.photo_id)
            update.catalog.append(c)
        if c.photo_id in seen or is_excluded(consent, c.photo_id, c.album_id):
            continue
        seen.add(c.photo_id)
        w = photo_weight(c.taken_at, half_life_days)
        update.add.append((c, w))
        stats = stats + StyleStats.of(c.embedding, c.features, w)

    counted = seen - set(update.remove)
    update.reingest = sorted(p for p, album in view.catalog.items()
                             if p not in counted and p not in deleted and not is_excluded(consent, p, album))
    update.stats = stats
    return update


def apply_update(view: UserView, update: UserUpdate) -> UserView:
    """The user's state after an update, held whole in memory: what a runner with per-user state
    keeps (the DuckDB store does the same in SQL, loading only what a batch touches)."""
    stored = {k: v for k, v in view.stored.items() if k not in update.remove}
    version = view.version + update.changes_style
    stored |= {c.photo_id: StoredContribution(c.album_id, w, c.embedding, c.features, version, c.sha256,
                                              c.on_device) for c, w in update.add}
    catalog = {k: v for k, v in view.catalog.items() if k not in update.tombstones}
    catalog |= {c.photo_id: c.album_id for c in update.catalog}
    return UserView(update.stats, version, view.consent | update.consent, stored,
                    view.deleted | set(update.tombstones), catalog)


def withdrawn_versions(view: UserView, update: UserUpdate) -> list[int]:
    """The user's versions that counted a photo this update withdraws: from the first version that
    counted one of them to the current one. They must stop influencing anything: the store deletes
    them (and the history), and the next style-vector event names them so serving drops them."""
    if not update.remove:
        return []
    first = min(view.stored[p].added_version for p in update.remove)
    return list(range(first, view.version + 1))
