"""What every route shares: the running services (database, producer, rate limiter, image store),
the caller's authentication and rate limits, and publishing events."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from kafka import KafkaProducer
from kafka.errors import KafkaError
from limits import parse
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException as StarletteHTTPException

from stylestream.api.auth import Principal, authenticate
from stylestream.api.config import ApiConfig
from stylestream.api.errors import ApiError, error_response
from stylestream.api.follower import Follower
from stylestream.api.metrics import ApiMetrics
from stylestream.api.models import ErrorBody
from stylestream.api.store import ApiStore
from stylestream.schemas.events import to_message
from stylestream.serving.image_store import ImageStore, NotInStore
from stylestream.streams import clients

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 429)}


@dataclass
class Services:
    cfg: ApiConfig
    store: ApiStore
    producer: KafkaProducer
    limiter: MovingWindowRateLimiter
    url_key: bytes
    loop: asyncio.AbstractEventLoop
    images: ImageStore  # where the serving worker writes (the API writes clips' starting images there too)
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
    """Refuses request bodies over `max_bytes` (declared or streamed) before a route reads them;
    `uploads` names paths that take larger bodies (a starting image) and their limits."""

    def __init__(self, app, max_bytes: int, uploads: dict[str, int] | None = None):
        self.app, self.max_bytes, self.uploads = app, max_bytes, uploads or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.uploads.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        message = f"request bodies are limited to {max_bytes} bytes"
        if not declared.isdigit():
            return await error_response(400, "invalid_request", "Content-Length is not a number")(scope, receive, send)
        if int(declared) > max_bytes:
            return await error_response(413, "request_too_large", message)(scope, receive, send)
        seen = 0

        async def counted():  # a body sent in chunks, without a length, is counted as it comes
            nonlocal seen
            received = await receive()
            seen += len(received.get("body", b""))
            if seen > max_bytes:
                raise StarletteHTTPException(413, message)  # passed through by FastAPI's body parsing
            return received
        return await self.app(scope, counted, send)



def services_of(request: Request) -> Services:
    return request.app.state.services


BEARER = HTTPBearer(auto_error=False, description="A sign-in JWT from the photo service (sub = user id), or a "
                                                    "grant token (ssg_...) the person made for an application.")


def caller(request: Request, _declared: Annotated[object, Depends(BEARER)] = None) -> Principal:
    """The authenticated caller, counted against their rate limits (the person's, and the grant's).
    (`_declared` puts the bearer scheme in the spec; the header is read here either way.)"""
    s = services_of(request)
    principal = authenticate(request.headers.get("authorization"), s.cfg.verifier, s.store)
    charge(s, principal, s.cfg.person_rate, s.cfg.grant_rate, "requests")
    return principal


def charge(s: Services, p: Principal, person_rate: str, grant_rate: str, what: str, cost: int = 1) -> None:
    """Count the request against the person's limit and, for a grant, the grant's: all or none, so a
    grant at its limit does not use up its person's. A request costing more than a whole limit is a
    400 (waiting would not help), not a 429."""
    buckets = [(person_rate, ("person", what, p.user_id))]
    if p.grant_id:
        buckets.append((grant_rate, ("grant", what, p.grant_id)))
    for text, key in buckets:
        if cost > parse(text).amount:
            raise ApiError(400, "over_limit", f"{cost} {what} is more than the {key[0]}'s whole limit of {text}; "
                           "ask for fewer")
    with s.limits_lock:
        for text, key in buckets:
            if not s.limiter.test(parse(text), *key, cost=cost):
                wait = max(1, int(s.limiter.get_window_stats(parse(text), *key).reset_time - time.time() + 0.999))
                raise ApiError(429, "rate_limited", f"the {key[0]}'s limit of {text} {what} is reached; retry in "
                               f"{wait} s", headers={"Retry-After": str(wait)})
        for text, key in buckets:
            s.limiter.hit(parse(text), *key, cost=cost)


Caller = Annotated[Principal, Depends(caller)]


def publish_or_503(s: Services, topic: str, events: list, trace_id: str | None = None) -> None:
    try:
        s.publish(topic, events, trace_id)
    except KafkaError as e:
        raise ApiError(503, "broker_unavailable", f"the event could not be published ({type(e).__name__}); "
                       "try again") from None



def read_stored(s: Services, uri: str) -> bytes:
    """A file the serving worker wrote (an image, a clip), only from the configured image store."""
    try:
        return s.images.read(uri)
    except NotInStore as e:
        raise ApiError(404, "image_gone", str(e)) from None
