"""`stylestream api`: the HTTP front door, one router per resource (api/routes/).

- `/v1/images/...` speaks OpenAI's Images API and `/v1/videos` its Videos API, personalized with the
  signed-in person's style: requests become generation-requests events, results come back through
  the topics (`follower.py` folds them into the API's own database).
- `/v1/me/...`: the person's own style, its history, what shaped it, their albums and photos,
  style-learning switches (consent events), a download of their data, forget-me; `/v1/me/grants`.
- `/`: the person's page (static/), which uses the same endpoints.

Every error has the OpenAI error shape; every endpoint checks the caller's scope, and the subject is
always the caller's own: no route takes another person's id.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException as StarletteHTTPException

from stylestream.api.config import ApiConfig
from stylestream.api.errors import NO_RETRY, ApiError, error_response
from stylestream.api.follower import Follower
from stylestream.api.routes import contributions, grants, images, me, service, videos
from stylestream.api.services import BodyLimit, Services
from stylestream.api.store import ApiStore
from stylestream.keyfiles import create_once
from stylestream.serving.image_store import ImageStore
from stylestream.streams import clients
from stylestream.streams.topics import ensure_topics

log = logging.getLogger(__name__)
FORM_OVERHEAD = 64 * 1024  # a video request's form fields beside its starting image


def create_app(cfg: ApiConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_topics(cfg.bootstrap_servers)
        create_once(cfg.url_key_path, secrets.token_bytes(32))
        store = ApiStore(cfg.db_path)
        services = Services(cfg, store, clients.producer(cfg.bootstrap_servers),
                            MovingWindowRateLimiter(storage_from_string(cfg.rate_limits)),
                            cfg.url_key_path.read_bytes(), asyncio.get_running_loop(), ImageStore(cfg.images_url))
        services.follower = Follower(cfg.bootstrap_servers, store, on_change=services.notify,
                                     metrics=services.metrics, on_forget=services.images.forget).start()
        app.state.services = services
        yield
        services.follower.close()
        services.producer.close()
        store.close()

    as_data_url = cfg.max_reference_bytes * 4 // 3 + 1024  # base64 is a third larger than the image it holds
    app = FastAPI(title="stylestream", version="1", lifespan=lifespan, form_limits={"max_part_size": as_data_url},
                  summary="Personalized images and short clips with each person's own style; the person's view of "
                          "their style, switches and grants.")
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, uploads={
        "/v1/videos": as_data_url + FORM_OVERHEAD, "/v1/me/contributions": contributions.MAX_BODY_BYTES})
    _errors(app)

    @app.middleware("http")
    async def replica(request: Request, call_next):
        """Which replica answered (several may serve one address): for operators reading a trace."""
        response = await call_next(request)
        response.headers["X-Stylestream-Replica"] = cfg.replica
        return response

    app.mount("/static", StaticFiles(directory=service.STATIC), name="static")
    for router in (service.router, images.router, videos.router, me.router, contributions.router, grants.router):
        app.include_router(router)
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
