"""The page, health, metrics and what this server accepts."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stylestream.api.services import services_of

STATIC = Path(__file__).parent.parent / "static"
# The page loads only its own script and style, images from here (or data: and blob: URLs), and clips
# as blob: URLs (fetched with the person's token).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; object-src 'none'; "
            "frame-ancestors 'none'")
router = APIRouter(tags=["service"])


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


@router.get("/livez")
def livez() -> dict:
    """The process answers (for a liveness probe: /healthz is also 503 while the broker is away)."""
    return {"status": "ok"}


@router.get("/healthz", responses={503: {"description": "the follower is failing"}})
def healthz(request: Request) -> JSONResponse:
    """ok, or 503 with the follower's last error while it cannot fold the topics (answers go stale)."""
    follower = services_of(request).follower
    error = follower.failing() if follower else "not started"
    return JSONResponse({"status": "degraded" if error else "ok", "follower": error or "ok",
                         "follower_retries": follower.retries if follower else 0},
                        status_code=503 if error else 200)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> Response:
    """Prometheus metrics: the follower's retries by error, and whether it is failing now."""
    return Response(generate_latest(services_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/config")
def config(request: Request) -> dict:
    """What this server's generation accepts."""
    cfg = services_of(request).cfg
    return {"sizes": list(cfg.sizes), "max_images": cfg.max_images, "generation_timeout_s": cfg.generation_timeout_s,
            "videos": cfg.video_limits()}
