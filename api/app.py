"""`stylestream api`: the HTTP front door.

- `POST /v1/images/generations` speaks the OpenAI Images API, personalized with the signed-in
  person's style: the request becomes generation-requests events (a trace id in their Kafka
  headers), and the response waits, bounded, for their results (`follower.py` folds them in).
- `/v1/me/...`: the person's own style, its history, what shaped it, their albums and photos,
  style-learning switches (consent events), a download of their data, forget-me, and grants.
- `/`: the person's page (static/), which uses the same endpoints.

Every error has the OpenAI error shape; every endpoint checks the caller's scope, and the subject is
always the caller's own: no route takes another person's id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import posixpath
import random
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import fsspec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from kafka import KafkaProducer
from kafka.errors import KafkaError
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from stylestream.api import views
from stylestream.api.auth import (
    ACCOUNT,
    CONSENT_WRITE,
    IMAGES_GENERATE,
    STYLE_READ,
    Principal,
    authenticate,
    new_grant,
)
from stylestream.api.config import ApiConfig
from stylestream.api.errors import NO_RETRY, ApiError, error_response
from stylestream.api.follower import Follower
from stylestream.api.metrics import ApiMetrics
from stylestream.api.models import (
    ErrorBody,
    GrantRequest,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    StyleLearningSwitch,
)
from stylestream.api.store import ApiStore
from stylestream.keyfiles import create_once
from stylestream.schemas.events import (
    GenerationRequested,
    StyleLearningToggled,
    UserForgotten,
    describe_validation_error,
    to_message,
)
from stylestream.streams import clients
from stylestream.streams.topics import CONSENT_EVENTS, GENERATION_REQUESTS, ensure_topics

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
URL_LIFETIME_S = 3600
# The page loads only its own script and style, and images from here (or data: and blob: URLs).
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'"
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 429)}


@dataclass
class Services:
    cfg: ApiConfig
    store: ApiStore
    producer: KafkaProducer
    limiter: MovingWindowRateLimiter
    url_key: bytes
    loop: asyncio.AbstractEventLoop
    follower: Follower | None = None
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    limits_lock: threading.Lock = field(default_factory=threading.Lock)  # test-then-hit is one step
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def sign(self, request_id: str, expires: int) -> str:
        return hmac.new(self.url_key, f"{request_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def publish(self, topic: str, events: list, trace_id: str | None = None) -> None:
        """Send and wait for the broker's acknowledgement (a blocking call: run it in a thread)."""
        headers = [(clients.TRACE_HEADER, trace_id.encode())] if trace_id else None
        sent = []
        for event in events:
            key, value = to_message(event)
            sent.append(self.producer.send(topic, key=key, value=value, headers=headers))
        clients.acknowledged(self.producer, sent, timeout_s=30)

    def notify(self) -> None:
        """Called by the follower's thread after each fold: wakes the requests waiting on the loop."""
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout_s: float) -> None:
        """Until the follower folds something new, or `timeout_s`; no thread is held meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout_s))


class BodyLimit:
    """Refuses request bodies over `max_bytes` (declared or streamed) before a route reads them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        limit = f"request bodies are limited to {self.max_bytes} bytes"
        if not declared.isdigit():
            return await error_response(400, "invalid_request", "Content-Length is not a number")(scope, receive, send)
        if int(declared) > self.max_bytes:
            return await error_response(413, "request_too_large", limit)(scope, receive, send)
        seen = 0

        async def counted():  # a body sent in chunks, without a length, is counted as it comes
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413, limit)  # passed through by FastAPI's body parsing
            return message
        return await self.app(scope, counted, send)


def create_app(cfg: ApiConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_topics(cfg.bootstrap_servers)
        create_once(cfg.url_key_path, secrets.token_bytes(32))
        store = ApiStore(cfg.db_path)
        services = Services(cfg, store, clients.producer(cfg.bootstrap_servers),
                            MovingWindowRateLimiter(MemoryStorage()), cfg.url_key_path.read_bytes(),
                            asyncio.get_running_loop())
        services.follower = Follower(cfg.bootstrap_servers, store, on_change=services.notify,
                                     metrics=services.metrics).start()
        app.state.services = services
        yield
        services.follower.close()
        services.producer.close()
        store.close()

    app = FastAPI(title="stylestream", version="1", lifespan=lifespan, summary=(
        "Personalized image generation with each person's own style; the person's view of their style, "
        "switches and grants."))
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    _errors(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app, cfg)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.param, e.generation_id, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                            for err in e.errors())
        return error_response(400, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code, "http_error")
        return error_response(e.status_code, code, str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "server_error", f"unexpected error ({type(e).__name__}); it was logged",
                              headers=NO_RETRY)  # it may have happened after the requests were published


def services_of(request: Request) -> Services:
    return request.app.state.services


BEARER = HTTPBearer(auto_error=False, description="A sign-in JWT from the photo service (sub = user id), or a "
                                                    "grant token (ssg_...) the person made for an application.")


def caller(request: Request, _declared: Annotated[object, Depends(BEARER)] = None) -> Principal:
    """The authenticated caller, counted against their rate limits (the person's, and the grant's).
    (`_declared` puts the bearer scheme in the spec; the header is read here either way.)"""
    s = services_of(request)
    principal = authenticate(request.headers.get("authorization"), s.cfg.verifier, s.store)
    _limit(s, principal, s.cfg.person_rate, s.cfg.grant_rate, "requests")
    return principal


def _limit(s: Services, p: Principal, person_rate: str, grant_rate: str, what: str, cost: int = 1) -> None:
    """Count the request against the person's limit and, for a grant, the grant's: all or none, so a
    grant at its limit does not use up its person's."""
    buckets = [(person_rate, ("person", what, p.user_id))]
    if p.grant_id:
        buckets.append((grant_rate, ("grant", what, p.grant_id)))
    with s.limits_lock:
        for text, key in buckets:
            if not s.limiter.test(parse(text), *key, cost=cost):
                wait = max(1, int(s.limiter.get_window_stats(parse(text), *key).reset_time - time.time() + 0.999))
                raise ApiError(429, "rate_limited", f"the {key[0]}'s limit of {text} {what} is reached; retry in "
                               f"{wait} s", headers={"Retry-After": str(wait)})
        for text, key in buckets:
            s.limiter.hit(parse(text), *key, cost=cost)


Caller = Annotated[Principal, Depends(caller)]


def _routes(app: FastAPI, cfg: ApiConfig) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/livez", tags=["service"])
    def livez() -> dict:
        """The process answers (for a liveness probe: /healthz is also 503 while the broker is away)."""
        return {"status": "ok"}

    @app.get("/healthz", tags=["service"], responses={503: {"description": "the follower is failing"}})
    def healthz(request: Request) -> JSONResponse:
        """ok, or 503 with the follower's last error while it cannot fold the topics (answers go stale)."""
        follower = services_of(request).follower
        error = follower.failing() if follower else "not started"
        return JSONResponse({"status": "degraded" if error else "ok", "follower": error or "ok",
                             "follower_retries": follower.retries if follower else 0},
                            status_code=503 if error else 200)

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics(request: Request) -> Response:
        """Prometheus metrics: the follower's retries by error, and whether it is failing now."""
        return Response(generate_latest(services_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/config", tags=["service"])
    def config() -> dict:
        """What this server's generation accepts."""
        return {"sizes": list(cfg.sizes), "max_images": cfg.max_images,
                "generation_timeout_s": cfg.generation_timeout_s}

    # --- generation (OpenAI-compatible) ----------------------------------------------------------
    @app.post("/v1/images/generations", tags=["images"], response_model=ImagesResponse,
              responses={**ERRORS, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def create_images(body: ImageGenerationRequest, request: Request, principal: Caller):
        """Generate `n` images with the caller's style; waits at most `generation_timeout_s` (then a
        504 names the generation id, to fetch later). `user` is accepted as OpenAI clients send it
        (their own end user's id) and changes nothing: the style is always the token's person's."""
        s = services_of(request)
        principal.require(IMAGES_GENERATE)
        width, height = _size(cfg, body)
        _limit(s, principal, cfg.person_images_rate, cfg.grant_images_rate, "images", cost=body.n)
        generation_id, trace_id = await run_in_threadpool(_start, s, principal, body, width, height)
        headers = {"x-request-id": generation_id, "trace-id": trace_id}
        if body.stream:
            return StreamingResponse(_stream(s, generation_id, body), media_type="text/event-stream", headers=headers)
        g = await _wait(s, generation_id, cfg.generation_timeout_s)
        status, failures = _status(g)
        if status == "pending":
            raise ApiError(504, "generation_timeout", f"the images were not ready within {cfg.generation_timeout_s:g} "
                           f"s; fetch them later with GET /v1/images/generations/{generation_id}",
                           generation_id=generation_id, headers=headers | NO_RETRY)
        if status == "failed":
            raise ApiError(422, "generation_failed", "; ".join(failures), generation_id=generation_id,
                           headers=headers | NO_RETRY)
        out = await run_in_threadpool(_images_response, s, g, str(request.base_url))
        return JSONResponse(out.model_dump(mode="json"), headers=headers)

    @app.get("/v1/images/generations/{generation_id}", tags=["images"], response_model=ImagesResponse,
             responses=ERRORS)
    def get_generation(generation_id: str, request: Request, principal: Caller) -> ImagesResponse:
        """A generation by id, finished or not (`status`): the way back after a timeout."""
        principal.require(IMAGES_GENERATE)
        s = services_of(request)
        g = s.store.generation(generation_id)
        if g is None or g["user_id"] != principal.user_id:
            raise ApiError(404, "not_found", f"no generation {generation_id} of yours")
        return _images_response(s, g, str(request.base_url))

    @app.get("/v1/images/files/{request_id}", tags=["images"], response_class=Response,
             responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    def image_file(request_id: str, request: Request, expires: int = 0, sig: str = "") -> Response:
        """An image by its signed URL (as the generation response gives it), or with the owner's token."""
        s = services_of(request)
        owner = s.store.image_owner(request_id)
        if sig:
            if not (hmac.compare_digest(sig.encode(), s.sign(request_id, expires).encode()) and time.time() < expires):
                raise ApiError(403, "bad_signature", "the image URL is expired or not valid")
        else:
            principal = caller(request)
            principal.require(IMAGES_GENERATE)
            if owner is None or owner[0] != principal.user_id:
                raise ApiError(404, "not_found", f"no image {request_id} of yours")
        if owner is None or not owner[1] or owner[1].get("type") != "generation_completed":
            raise ApiError(404, "not_found", f"no image {request_id}")
        return Response(_read_image(cfg, owner[1]["image_uri"]), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    # --- the person's own -------------------------------------------------------------------------
    @app.get("/v1/me", tags=["me"], responses=ERRORS)
    def me(principal: Caller) -> dict:
        return {"user_id": principal.user_id, "scopes": sorted(principal.scopes), "grant_id": principal.grant_id}

    @app.get("/v1/me/style", tags=["me"], responses=ERRORS)
    def my_style(request: Request, principal: Caller) -> dict:
        """The latest style: version, style code, palette, the look in words, named features, facets."""
        principal.require(STYLE_READ)
        event = services_of(request).store.style(principal.user_id)
        if event is None:
            raise ApiError(404, "no_style", "no style yet: upload photos with style learning on")
        return views.style(event)

    @app.get("/v1/me/style/history", tags=["me"], responses=ERRORS)
    def my_history(principal: Caller) -> dict:
        """Every version over time, with its drift from the first and the previous, from the history."""
        principal.require(STYLE_READ)
        return {"versions": views.history(cfg.layout.state, principal.user_id)}

    @app.get("/v1/me/style/explanation", tags=["me"], responses=ERRORS)
    def my_explanation(request: Request, principal: Caller) -> dict:
        """What shaped the latest style: the manifest's photos and the ones pulling each feature."""
        principal.require(STYLE_READ)
        manifest = services_of(request).store.manifest(principal.user_id)
        if manifest is None:
            raise ApiError(404, "no_style", "no style manifest yet")
        return {k: manifest[k] for k in ("version", "style_code", "basis", "photos", "explanation")}

    @app.get("/v1/me/albums", tags=["me"], responses=ERRORS)
    def my_albums(request: Request, principal: Caller) -> dict:
        """Albums as catalogued (ids and counts only), each with its style-learning switch."""
        principal.require(STYLE_READ)
        store = services_of(request).store
        return views.albums(store.photos(principal.user_id), store.consent(principal.user_id))

    @app.get("/v1/me/photos", tags=["me"], responses=ERRORS)
    def my_photos(request: Request, principal: Caller) -> dict:
        """Photos as catalogued: references only (id, album, upload day), each with whether it counts."""
        principal.require(STYLE_READ)
        store = services_of(request).store
        return {"photos": views.photos(store.photos(principal.user_id), store.consent(principal.user_id))}

    @app.put("/v1/me/style-learning", tags=["me"], status_code=202, responses=ERRORS)
    async def switch_learning(body: StyleLearningSwitch, request: Request, principal: Caller) -> dict:
        """Style learning on or off for the person, an album or a photo: a consent event ingestion applies."""
        principal.require(CONSENT_WRITE)
        if (body.scope == "user") != (body.id is None):
            raise ApiError(400, "invalid_request", "give `id` for an album or photo, and none for scope 'user'", "id")
        now = datetime.now(UTC)
        event = StyleLearningToggled(event_id=f"api-{uuid.uuid4().hex}", user_id=principal.user_id, event_time=now,
                                     scope=body.scope, scope_id=body.id, enabled=body.enabled)
        await run_in_threadpool(_publish_or_503, services_of(request), CONSENT_EVENTS, [event])
        return {"event_id": event.event_id, "scope": body.scope, "id": body.id, "enabled": body.enabled}

    @app.get("/v1/me/generations", tags=["me"], responses=ERRORS)
    def my_generations(request: Request, principal: Caller, limit: int = 30) -> dict:
        """The gallery: the person's latest generations through this API, with the style version used."""
        principal.require(IMAGES_GENERATE)
        s = services_of(request)
        return {"generations": [_images_response(s, g | {"response_format": "url"}, str(request.base_url)
                                                 ).model_dump(mode="json") | {
            "prompt": g["prompt"], "created_at": g["created_at"]}
            for g in s.store.generations_of(principal.user_id, max(1, min(limit, 100)))]}

    @app.get("/v1/me/export", tags=["me"], responses=ERRORS)
    def my_export(request: Request, principal: Caller) -> Response:
        """Everything the service shows of the person, as one JSON download (their sign-in only)."""
        principal.require(ACCOUNT)
        s = services_of(request)
        user = principal.user_id
        style, photos, consent = s.store.style(user), s.store.photos(user), s.store.consent(user)
        data = {"user_id": user, "exported_at": datetime.now(UTC).isoformat(),
                "style": views.style(style) if style else None,
                "history": views.history(cfg.layout.state, user), "manifest": s.store.manifest(user),
                "albums": views.albums(photos, consent), "photos": views.photos(photos, consent),
                "generations": [{k: v for k, v in g.items() if k != "images"} | {
                    "results": [r for _, r in g["images"]]} for g in s.store.generations_of(user, 10_000)],
                "grants": [g.public() for g in s.store.grants_of(user)]}
        return Response(json.dumps(data, indent=2), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="stylestream-{user}.json"'})

    @app.post("/v1/me/forget", tags=["me"], status_code=202, responses=ERRORS)
    async def forget_me(request: Request, principal: Caller) -> dict:
        """Ask to be forgotten: ingestion erases every record and signs a receipt under the request id."""
        principal.require(ACCOUNT)
        event = UserForgotten(event_id=f"forget-{uuid.uuid4().hex}", user_id=principal.user_id,
                              event_time=datetime.now(UTC))
        await run_in_threadpool(_publish_or_503, services_of(request), CONSENT_EVENTS, [event])
        return {"request_id": event.event_id,
                "receipt": f"stylestream receipt get {event.event_id} (once ingestion has erased you)"}

    # --- grants --------------------------------------------------------------------------------------
    @app.get("/v1/me/grants", tags=["grants"], responses=ERRORS)
    def my_grants(request: Request, principal: Caller) -> dict:
        principal.require(ACCOUNT)
        return {"grants": [g.public() for g in services_of(request).store.grants_of(principal.user_id)]}

    @app.post("/v1/me/grants", tags=["grants"], status_code=201, responses=ERRORS)
    def create_grant(body: GrantRequest, request: Request, principal: Caller) -> dict:
        """A token for another application with these scopes until it expires or is revoked; shown once."""
        principal.require(ACCOUNT)
        grant, token = new_grant(principal.user_id, body.name, list(body.scopes), timedelta(seconds=body.expires_in_s))
        services_of(request).store.add_grant(grant)
        return {**grant.public(), "token": token}

    @app.delete("/v1/me/grants/{grant_id}", tags=["grants"], responses=ERRORS)
    def revoke_grant(grant_id: str, request: Request, principal: Caller) -> dict:
        principal.require(ACCOUNT)
        if not services_of(request).store.revoke_grant(principal.user_id, grant_id):
            raise ApiError(404, "not_found", f"no grant {grant_id} of yours")
        return {"id": grant_id, "revoked": True}


def _size(cfg: ApiConfig, body: ImageGenerationRequest) -> tuple[int, int]:
    size = body.size or cfg.sizes[0]
    if size not in cfg.sizes:
        raise ApiError(400, "invalid_size", f"size must be one of {', '.join(cfg.sizes)}", "size")
    if body.n > cfg.max_images:
        raise ApiError(400, "invalid_n", f"n must be at most {cfg.max_images}", "n")
    width, height = size.split("x")
    return int(width), int(height)


def _publish_or_503(s: Services, topic: str, events: list, trace_id: str | None = None) -> None:
    try:
        s.publish(topic, events, trace_id)
    except KafkaError as e:
        raise ApiError(503, "broker_unavailable", f"the event could not be published ({type(e).__name__}); "
                       "try again") from None


def _start(s: Services, principal: Principal, body: ImageGenerationRequest, width: int,
           height: int) -> tuple[str, str]:
    """Record the generation, then publish one request per image, all under one trace id; a
    generation whose requests could not be published is recorded as failed."""
    generation_id, trace_id = f"gen-{uuid.uuid4().hex}", secrets.token_hex(16)
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    try:  # the event contract has the last word on what a request may combine
        requests = [GenerationRequested(
            event_id=f"{generation_id}-{i}", user_id=principal.user_id, event_time=datetime.now(UTC),
            request_id=f"{generation_id}-{i}", prompt=body.prompt, seed=seed + i, num_inference_steps=s.cfg.steps,
            width=width, height=height, style_strength=body.style_strength, style_version=body.style_version,
            style_code=body.style_code, facet=body.facet, partial_images=body.partial_images if body.stream else 0)
            for i in range(body.n)]
    except ValidationError as e:
        raise ApiError(400, "invalid_request", describe_validation_error(e)) from None
    s.store.add_generation(generation_id, principal.user_id, principal.grant_id, trace_id, body.prompt,
                           f"{width}x{height}", body.response_format, [r.request_id for r in requests])
    try:
        _publish_or_503(s, GENERATION_REQUESTS, requests, trace_id)
    except ApiError as e:
        s.store.fail_generation(generation_id, e.message)
        raise
    return generation_id, trace_id


async def _wait(s: Services, generation_id: str, timeout_s: float) -> dict:
    """The generation once every image has its result, or as it stands after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        g = await run_in_threadpool(s.store.generation, generation_id)  # the follower may hold the lock
        if g is None:  # the person was forgotten meanwhile
            raise ApiError(404, "not_found", f"generation {generation_id} is gone: its person was forgotten")
        if _status(g)[0] != "pending" or time.monotonic() >= deadline:
            return g
        await s.wait_changed(min(1.0, deadline - time.monotonic()))


def _status(g: dict) -> tuple[str, list[str]]:
    """pending, failed or completed, and the reasons of the failed images."""
    results = [r for _, r in g["images"]]
    failures = [r["reason"] for r in results if r is not None and r["type"] == "generation_failed"]
    return ("pending" if None in results else "failed" if failures else "completed"), failures


def _read_image(cfg: ApiConfig, uri: str) -> bytes:
    """An image the serving worker wrote: only from the configured image store (its protocol, under
    its folder), whatever a result event names; nothing else is ever opened."""
    fs, root = fsspec.core.url_to_fs(cfg.images_url)
    protocol, _ = fsspec.core.split_protocol(uri)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    path = posixpath.normpath(fs._strip_protocol(uri)) if (protocol or "file") in protocols else None
    if path is None or not path.startswith(posixpath.normpath(root).rstrip("/") + "/"):
        log.warning("refused to read an image outside %s: %s", cfg.images_url, uri)
        raise ApiError(404, "image_gone", "the image is not in this service's image store")
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ApiError(404, "image_gone", "the image is no longer stored (its person may be forgotten)") from None


def _images_response(s: Services, g: dict, base_url: str) -> ImagesResponse:
    """The OpenAI-shaped answer for a generation (reads the images for b64_json: run it in a thread)."""
    data = []
    for request_id, result in g["images"]:
        if result is None or result["type"] != "generation_completed":
            continue
        item = ImageData(request_id=request_id, revised_prompt=g["prompt"], style_version=result.get("style_version"),
                         style_code=result.get("style_code"), facet=result.get("facet"))
        if g["response_format"] == "b64_json":
            item.b64_json = base64.b64encode(_read_image(s.cfg, result["image_uri"])).decode()
        else:
            expires = int(time.time()) + URL_LIFETIME_S
            item.url = f"{base_url}v1/images/files/{request_id}?expires={expires}&sig={s.sign(request_id, expires)}"
        data.append(item)
    status, failures = _status(g)
    created = int(datetime.fromisoformat(g["created_at"]).timestamp())
    return ImagesResponse(created=created, data=data, id=g["id"], trace_id=g["trace_id"], status=status,
                          failures=failures)


async def _stream(s: Services, generation_id: str, body: ImageGenerationRequest) -> AsyncIterator[str]:
    """Server-sent events as the OpenAI API streams images: image_generation.partial_image for each
    preview as the worker publishes it, then image_generation.completed per image (b64_json), an
    error event on failure or timeout, and comments while nothing new has come."""
    deadline = time.monotonic() + s.cfg.generation_timeout_s
    sent: set[tuple[str, int]] = set()
    common = {"size": body.size or s.cfg.sizes[0], "quality": "auto", "background": "auto", "output_format": "png"}

    def error_event(status: int, code: str, message: str) -> str:
        error = {"status": status, "code": code, "message": message, "generation_id": generation_id}
        return f"event: error\ndata: {json.dumps({'type': 'error', 'error': error})}\n\n"

    try:
        while True:
            # The generation before its previews: a preview is folded no later than its image's result
            # (one partition), so none is skipped on the way to `completed`.
            g = await run_in_threadpool(s.store.generation, generation_id)
            for request_id, index, uri in await run_in_threadpool(s.store.previews, generation_id):
                if (request_id, index) not in sent:
                    sent.add((request_id, index))
                    png = await run_in_threadpool(_read_image, s.cfg, uri)
                    event = {"type": "image_generation.partial_image", "partial_image_index": index,
                             "b64_json": base64.b64encode(png).decode(), "created_at": int(time.time()),
                             "request_id": request_id, **common}
                    yield f"event: image_generation.partial_image\ndata: {json.dumps(event)}\n\n"
            status, failures = _status(g) if g else ("failed", ["its person was forgotten"])
            if status == "completed":
                out = await run_in_threadpool(_images_response, s, g | {"response_format": "b64_json"}, "")
                for item in out.data:
                    event = {"type": "image_generation.completed", "b64_json": item.b64_json,
                             "created_at": out.created,
                             "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                       "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
                             "request_id": item.request_id, "style_version": item.style_version,
                             "style_code": item.style_code, "trace_id": out.trace_id, **common}
                    yield f"event: image_generation.completed\ndata: {json.dumps(event)}\n\n"
                return
            if status == "failed":
                yield error_event(422, "generation_failed", "; ".join(failures))
                return
            if time.monotonic() > deadline:
                yield error_event(504, "generation_timeout", f"not ready within {s.cfg.generation_timeout_s:g} s")
                return
            yield ": generating\n\n"
            await s.wait_changed(1.0)
    except ApiError as e:  # the response has begun: the error travels as an event
        yield error_event(e.status, e.code, e.message)
