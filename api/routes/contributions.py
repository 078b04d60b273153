"""`/v1/me/contributions`: what the person's device computed from their photos (`stylestream device
sync`), published as photo_embedded events under the token's person only; ingestion checks each
against its basis and counts it as an upload it decoded itself. No pixel ever reaches this route."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from stylestream.api.auth import PHOTOS_CONTRIBUTE
from stylestream.api.services import ERRORS, Caller, publish_or_503, services_of
from stylestream.schemas.events import DeviceContribution
from stylestream.streams.topics import PHOTO_EVENTS

MAX_PER_REQUEST = 100
MAX_BODY_BYTES = 4 * 1024 * 1024  # a hundred 1024-dimension embeddings with room to spare
router = APIRouter(tags=["me"])


class Contributions(BaseModel):
    contributions: list[DeviceContribution] = Field(min_length=1, max_length=MAX_PER_REQUEST)


@router.get("/v1/me/contributions", responses=ERRORS)
def contributed(request: Request, principal: Caller) -> dict:
    """What a device needs before it sends: the basis the service computes styles with (null until a
    style exists), and the photos of the person it already holds from their device."""
    principal.require(PHOTOS_CONTRIBUTE)
    store = services_of(request).store
    basis = store.basis()
    return {"basis": {k: basis[k] for k in ("model", "weights", "preprocessing")} if basis else None,
            "photo_ids": store.device_photos(principal.user_id)}


@router.post("/v1/me/contributions", status_code=202, responses=ERRORS)
async def contribute(body: Contributions, request: Request, principal: Caller) -> dict:
    """Photos analysed on the person's device: each becomes a photo_embedded event of the token's
    person (whoever else a contribution might name, none can), for ingestion to count."""
    principal.require(PHOTOS_CONTRIBUTE)
    now = datetime.now(UTC)
    events = [c.as_event(principal.user_id, now) for c in body.contributions]
    await run_in_threadpool(publish_or_503, services_of(request), PHOTO_EVENTS, events)
    return {"accepted": len(events), "event_ids": [e.event_id for e in events]}
