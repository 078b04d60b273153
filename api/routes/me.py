"""`/v1/me/...`: the person's own style, its history, what shaped it, their albums and photos,
style-learning switches (consent events), their gallery, a download of their data, and forget-me.
The subject is always the caller's own: no route takes another person's id."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from stylestream.api import views
from stylestream.api.auth import ACCOUNT, CONSENT_WRITE, IMAGES_GENERATE, STYLE_READ
from stylestream.api.errors import ApiError
from stylestream.api.models import StyleLearningSwitch
from stylestream.api.routes.images import images_response
from stylestream.api.routes.videos import video_object
from stylestream.api.services import ERRORS, Caller, publish_or_503, services_of
from stylestream.schemas.events import StyleLearningToggled, UserForgotten
from stylestream.streams.topics import CONSENT_EVENTS

router = APIRouter(tags=["me"])


@router.get("/v1/me", responses=ERRORS)
def me(principal: Caller) -> dict:
    return {"user_id": principal.user_id, "scopes": sorted(principal.scopes), "grant_id": principal.grant_id}


@router.get("/v1/me/style", responses=ERRORS)
def my_style(request: Request, principal: Caller) -> dict:
    """The latest style: version, style code, palette, the look in words, named features, facets."""
    principal.require(STYLE_READ)
    event = services_of(request).store.style(principal.user_id)
    if event is None:
        raise ApiError(404, "no_style", "no style yet: upload photos with style learning on")
    return views.style(event)


@router.get("/v1/me/style/history", responses=ERRORS)
def my_history(request: Request, principal: Caller) -> dict:
    """Every version over time, with its drift from the first and the previous, from the history."""
    principal.require(STYLE_READ)
    return {"versions": views.history(services_of(request).cfg.layout.state, principal.user_id)}


@router.get("/v1/me/style/explanation", responses=ERRORS)
def my_explanation(request: Request, principal: Caller) -> dict:
    """What shaped the latest style: the manifest's photos and the ones pulling each feature."""
    principal.require(STYLE_READ)
    manifest = services_of(request).store.manifest(principal.user_id)
    if manifest is None:
        raise ApiError(404, "no_style", "no style manifest yet")
    return {k: manifest[k] for k in ("version", "style_code", "basis", "photos", "explanation")}


@router.get("/v1/me/albums", responses=ERRORS)
def my_albums(request: Request, principal: Caller) -> dict:
    """Albums as catalogued (ids and counts only), each with its style-learning switch."""
    principal.require(STYLE_READ)
    store = services_of(request).store
    return views.albums(store.photos(principal.user_id), store.consent(principal.user_id))


@router.get("/v1/me/photos", responses=ERRORS)
def my_photos(request: Request, principal: Caller) -> dict:
    """Photos as catalogued: references only (id, album, upload day), each with whether it counts and
    whether it was analysed on the person's device."""
    principal.require(STYLE_READ)
    store = services_of(request).store
    return {"photos": views.photos(store.photos(principal.user_id), store.consent(principal.user_id))}


@router.put("/v1/me/style-learning", status_code=202, responses=ERRORS)
async def switch_learning(body: StyleLearningSwitch, request: Request, principal: Caller) -> dict:
    """Style learning on or off for the person, an album or a photo: a consent event ingestion applies."""
    principal.require(CONSENT_WRITE)
    if (body.scope == "user") != (body.id is None):
        raise ApiError(400, "invalid_request", "give `id` for an album or photo, and none for scope 'user'", "id")
    now = datetime.now(UTC)
    event = StyleLearningToggled(event_id=f"api-{uuid.uuid4().hex}", user_id=principal.user_id, event_time=now,
                                 scope=body.scope, scope_id=body.id, enabled=body.enabled)
    await run_in_threadpool(publish_or_503, services_of(request), CONSENT_EVENTS, [event])
    return {"event_id": event.event_id, "scope": body.scope, "id": body.id, "enabled": body.enabled}


@router.get("/v1/me/generations", responses=ERRORS)
def my_generations(request: Request, principal: Caller, limit: int = 30) -> dict:
    """The gallery: the person's latest generations through this API, with the style version used."""
    principal.require(IMAGES_GENERATE)
    s = services_of(request)
    return {"generations": [images_response(s, g | {"response_format": "url"}, str(request.base_url)
                                             ).model_dump(mode="json") | {
        "prompt": g["prompt"], "created_at": g["created_at"]}
        for g in s.store.generations_of(principal.user_id, max(1, min(limit, 100)))]}


@router.get("/v1/me/export", responses=ERRORS)
def my_export(request: Request, principal: Caller) -> Response:
    """Everything the service shows of the person, as one JSON download (their sign-in only)."""
    principal.require(ACCOUNT)
    s = services_of(request)
    user = principal.user_id
    style, photos, consent = s.store.style(user), s.store.photos(user), s.store.consent(user)
    data = {"user_id": user, "exported_at": datetime.now(UTC).isoformat(),
            "style": views.style(style) if style else None,
            "history": views.history(s.cfg.layout.state, user), "manifest": s.store.manifest(user),
            "albums": views.albums(photos, consent), "photos": views.photos(photos, consent),
            "generations": [{k: v for k, v in g.items() if k != "images"} | {
                "results": [r for _, r in g["images"]]} for g in s.store.generations_of(user, 10_000)],
            "videos": [video_object(v).model_dump(mode="json") for v in s.store.videos_of(user, 10_000)],
            "grants": [g.public() for g in s.store.grants_of(user)]}
    return Response(json.dumps(data, indent=2), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="stylestream-{user}.json"'})


@router.post("/v1/me/forget", status_code=202, responses=ERRORS)
async def forget_me(request: Request, principal: Caller) -> dict:
    """Ask to be forgotten: ingestion erases every record and signs a receipt under the request id."""
    principal.require(ACCOUNT)
    event = UserForgotten(event_id=f"forget-{uuid.uuid4().hex}", user_id=principal.user_id,
                          event_time=datetime.now(UTC))
    await run_in_threadpool(publish_or_503, services_of(request), CONSENT_EVENTS, [event])
    return {"request_id": event.event_id,
            "receipt": f"stylestream receipt get {event.event_id} (once ingestion has erased you)"}
