"""Planning one ingestion cycle: what the store must write, as a pure function of what it holds.

The cycle's pipeline (pipelines/ingest.py, step PlanUserUpdates) reads each batch user's view from the
store, calls `plan_cycle`, and the store then writes what it returns (step Commit); every decision is
made here, with no database: the per-user rule (transforms/style.py),
the versions a withdrawal redacts, the facets (transforms/facets.py) and the style-vector events
(transforms/vectors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stylestream.privacy.erasure import erasure_messages
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import (
    ErasedRequest,
    ErasureNotice,
    StyleBasis,
    StyleManifest,
    StyleVectorUpdated,
    UserForgotten,
    to_message,
)
from stylestream.streams.topics import STYLE_MANIFESTS, STYLE_VECTORS
from stylestream.transforms.facets import Facet, facets_of
from stylestream.transforms.manifest import manifest_photos, style_code, style_manifest
from stylestream.transforms.records import UserBatch
from stylestream.transforms.style import (
    StoredContribution,
    StyleStats,
    UserUpdate,
    UserView,
    apply_update,
    plan_user_update,
    withdrawn_versions,
)
from stylestream.transforms.vectors import style_vector_event


@dataclass(frozen=True)
class NewVersion:
    """A user's new style version: what the store records, the event it publishes and its manifest."""

    user_id: str
    version: int
    stats: StyleStats  # the sums behind it
    facets: list[Facet]
    event: StyleVectorUpdated
    manifest: StyleManifest

    def messages(self) -> list[tuple[str, bytes, bytes]]:
        """(topic, key, value) of what the version publishes: its style vector and its manifest."""
        return [(STYLE_VECTORS, *to_message(self.event)), (STYLE_MANIFESTS, *to_message(self.manifest))]

    def row(self, cycle: int, updated_at: datetime) -> dict:
        """The version as a row of `style_versions` and of the history (schemas/tables.STYLE_HISTORY)."""
        embedding, features = self.stats.vector()
        return {"user_id": self.user_id, "version": self.version, "cycle": cycle, "updated_at": updated_at,
                "photo_count": self.stats.count, "total_weight": self.stats.total_weight,
                "embedding": embedding.tolist(), "features": features.tolist(),
                "facets": [{"photo_count": f.stats.count, "total_weight": f.stats.total_weight,
                            "embedding": f.stats.vector()[0].tolist(), "features": f.stats.vector()[1].tolist()}
                           for f in self.facets],
                "tombstone": False}


def new_version(user_id: str, version: int, stats: StyleStats, stored: dict[str, StoredContribution],
                withdrawn: list[int], basis: StyleBasis, now: datetime) -> NewVersion:
    """Version `version` of a user's style: `stats` over `stored` (every contribution that counts,
    for the facets and the manifest), naming the earlier versions it withdraws."""
    facets = facets_of(stored)
    photos = manifest_photos(stored)
    event = style_vector_event(user_id, version, stats, facets, withdrawn, style_code(basis, photos), now)
    return NewVersion(user_id, version, stats, facets, event,
                      style_manifest(basis, photos, stored, stats, facets, event, now))


@dataclass(frozen=True)
class Redaction:
    """Versions of a user that counted a withdrawn photo: deleted from the state and the history."""

    user_id: str
    from_version: int
    to_version: int


@dataclass(frozen=True)
class UserPlan:
    """What one batch does to one user: the changes, the user's state after them, and, when their
    style changed, the new version and the versions it withdraws."""

    update: UserUpdate
    after: UserView
    version: NewVersion | None
    redaction: Redaction | None


def plan_user(view: UserView, batch: UserBatch, basis: StyleBasis, now: datetime) -> UserPlan:
    """One user's share of a cycle (the local store) or one event (the streaming pipeline's state)."""
    update = plan_user_update(view, batch, basis.half_life_days)
    after = apply_update(view, update)
    if not update.changes_style:
        return UserPlan(update, after, None, None)
    withdrawn = withdrawn_versions(view, update)
    version = new_version(batch.user_id, after.version, update.stats, after.stored, withdrawn, basis, now)
    return UserPlan(update, after, version,
                    Redaction(batch.user_id, withdrawn[0], withdrawn[-1]) if withdrawn else None)


@dataclass(frozen=True)
class Erasure:
    """A person who asked to be forgotten: the store deletes every record of them and answers each
    request with a signed receipt. Their events up to `forgotten_at` are void, whenever they arrive."""

    user_id: str
    requests: list[UserForgotten]
    last_version: int  # their latest style version, all of which are withdrawn
    forgotten_at: datetime  # the latest request's event time

    @property
    def tombstone_version(self) -> int:
        """The tombstone's version; what they send later is numbered after it, so no version number of
        theirs ever names two styles (nor two history rows)."""
        return self.last_version + 1

    def notice(self, deleted: dict[str, int]) -> ErasureNotice:
        """What the tombstone says of it: the requests, and what the state deleted (`deleted`)."""
        return ErasureNotice(requests=[ErasedRequest(event_id=r.event_id, requested_at=r.event_time)
                                       for r in self.requests], deleted=deleted)

    def messages(self, deleted: dict[str, int], now: datetime) -> list[tuple[str, bytes, bytes | None]]:
        """The tombstones it publishes (privacy/erasure.py)."""
        return erasure_messages(self.user_id, self.last_version, now, self.notice(deleted))


def after_forgets(batch: UserBatch, forgotten_at: datetime | None, last_version: int,
                  ) -> tuple[UserBatch, Erasure | None]:
    """The forget rule, for every runner: (what of the batch still counts, the erasure it asks for).
    The user's events up to an earlier erasure (`forgotten_at`) are void, whenever they arrive (late
    uploads, re-published ones, a repeated request); a forget request erases the user's state
    (`last_version`: their latest version, all withdrawn), and what they sent after it starts from nothing
    (numbered after the tombstone)."""
    if forgotten_at is not None:
        batch = batch.after(forgotten_at)
    if not batch.forgets:
        return batch, None
    erasure = Erasure(batch.user_id, batch.forgets, last_version, max(f.event_time for f in batch.forgets))
    return batch.after(erasure.forgotten_at), erasure


@dataclass(frozen=True)
class CycleWrites:
    updates: dict[str, UserUpdate]  # every batch user's changes, by user id
    versions: list[NewVersion]  # for users whose style changed, by user id
    redactions: list[Redaction]
    erasures: list[Erasure]
    dead_letters: list[DeadLetter]  # contributions the state refused (`UserUpdate.refused`)
    photos: int  # contributions (embedded uploads) among the cycle's events
    planned_at: datetime  # the new versions' time

    @property
    def reingest(self) -> list[tuple[str, str]]:
        """(user, photo) of catalogued uploads that count again: their upload events are published anew."""
        return [(u, p) for u, up in sorted(self.updates.items()) for p in up.reingest]


def plan_cycle(views: dict[str, UserView], batches: list[UserBatch], basis: StyleBasis,
               now: datetime) -> CycleWrites:
    """The writes of one cycle. `views` holds, for every batch user, everything the store keeps of
    them that the batch can touch (every stored contribution, for the facets and redactions)."""
    plans, erasures, photos = {}, [], 0
    for b in sorted(batches, key=lambda b: b.user_id):
        view = views[b.user_id]
        # 1. Forget requests, and what an earlier erasure voids
        b, erasure = after_forgets(b, view.forgotten_at, view.version)
        if erasure:
            erasures.append(erasure)
            view = UserView.empty(len(view.stats.sum_embedding), len(view.stats.sum_features))
            view.version = erasure.tombstone_version
        # 2. The rest, by the per-user rule
        if not b.empty:
            plans[b.user_id] = plan_user(view, b, basis, now)
            photos += len(b.contributions) - len(plans[b.user_id].update.refused)
    return CycleWrites({u: p.update for u, p in plans.items()},
                       [p.version for p in plans.values() if p.version],
                       [p.redaction for p in plans.values() if p.redaction], erasures,
                       [d for p in plans.values() for d in p.update.dead_letters], photos, now)
