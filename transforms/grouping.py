"""Gather each user's uploads, deletions and consent events of a cycle into one UserBatch."""

from __future__ import annotations

import apache_beam as beam

from stylestream.schemas.events import is_forget_request
from stylestream.transforms.records import UserBatch


def to_user_batch(user_id: str, grouped: dict[str, list]) -> UserBatch:
    consent = [s.event for s in grouped["toggles"]]
    return UserBatch(
        user_id,
        contributions=list(grouped["contributions"]),
        deletes=[s.event for s in grouped["deletes"]],
        toggles=[e for e in consent if not is_forget_request(e)],
        forgets=sorted((e for e in consent if is_forget_request(e)), key=lambda e: e.event_id),
    )

class GroupByUser(beam.PTransform):
    """(contributions, deletes, toggles) -> one UserBatch per user with any of them."""

    def expand(self, pcolls):
        contributions, deletes, toggles = pcolls
        return (
            {
                "contributions": contributions | "KeyContributions" >> beam.Map(lambda c: (c.user_id, c)),
                "deletes": deletes | "KeyDeletes" >> beam.Map(lambda s: (s.event.user_id, s)),
                "toggles": toggles | "KeyToggles" >> beam.Map(lambda s: (s.event.user_id, s)),
            }
            | "CoGroup" >> beam.CoGroupByKey()
            | "ToUserBatch" >> beam.MapTuple(to_user_batch)
        )
