"""`/v1/images/...`: OpenAI's Images API, personalized with the signed-in person's style. A request
becomes generation-requests events (a trace id in their Kafka headers), and the response waits,
bounded, for their results (`follower.py` folds them in); or streams previews and images as
server-sent events."""

from __future__ import annotations

import base64
import hmac
import json
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from stylestream.api import generations
from stylestream.api.auth import IMAGES_GENERATE, Principal
from stylestream.api.config import ApiConfig
from stylestream.api.errors import NO_RETRY, ApiError
from stylestream.api.models import ErrorBody, ImageData, ImageGenerationRequest, ImagesResponse
from stylestream.api.services import ERRORS, Caller, Services, caller, charge, read_stored, services_of
from stylestream.schemas.events import GenerationRequested

URL_LIFETIME_S = 3600
router = APIRouter(tags=["images"])
SSE_EVENT = {  # one server-sent event of a streamed answer (stream: true), as OpenAI streams images
    "type": "object", "required": ["data"], "properties": {
        "event": {"enum": ["image_generation.partial_image", "image_generation.completed", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"}}}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses={
    **ERRORS, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}, 504: {"model": ErrorBody},
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}})
async def create_images(body: ImageGenerationRequest, request: Request, principal: Caller):
    """Generate `n` images with the caller's style; waits at most `generation_timeout_s` (then a
    504 names the generation id, to fetch later). `user` is accepted as OpenAI clients send it
    (their own end user's id) and changes nothing: the style is always the token's person's."""
    s = services_of(request)
    cfg = s.cfg
    principal.require(IMAGES_GENERATE)
    width, height = _size(cfg, body)
    charge(s, principal, cfg.person_images_rate, cfg.grant_images_rate, "images", cost=body.n)
    generation_id, trace_id = await run_in_threadpool(_start, s, principal, body, width, height)
    headers = {"x-request-id": generation_id, "trace-id": trace_id}
    if body.stream:
        return StreamingResponse(_stream(s, generation_id, body), media_type="text/event-stream", headers=headers)
    g = await _wait(s, generation_id, cfg.generation_timeout_s)
    status, failures = generations.status(g)
    if status == "pending":
        raise ApiError(504, "generation_timeout", f"the images were not ready within {cfg.generation_timeout_s:g} "
                       f"s; fetch them later with GET /v1/images/generations/{generation_id}",
                       generation_id=generation_id, headers=headers | NO_RETRY)
    if status == "failed":
        raise ApiError(422, "generation_failed", "; ".join(failures), generation_id=generation_id,
                       headers=headers | NO_RETRY)
    out = await run_in_threadpool(images_response, s, g, str(request.base_url))
    return JSONResponse(out.model_dump(mode="json"), headers=headers)


@router.get("/v1/images/generations/{generation_id}", response_model=ImagesResponse, responses=ERRORS)
def get_generation(generation_id: str, request: Request, principal: Caller) -> ImagesResponse:
    """A generation by id, finished or not (`status`): the way back after a timeout."""
    principal.require(IMAGES_GENERATE)
    s = services_of(request)
    g = s.store.generation(generation_id)
    if g is None or g["user_id"] != principal.user_id:
        raise ApiError(404, "not_found", f"no generation {generation_id} of yours")
    return images_response(s, g, str(request.base_url))


@router.get("/v1/images/files/{request_id}", response_class=Response,
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
    return Response(read_stored(s, owner[1]["image_uri"]), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})


def _size(cfg: ApiConfig, body: ImageGenerationRequest) -> tuple[int, int]:
    if body.n > cfg.max_images:
        raise ApiError(400, "invalid_n", f"n must be at most {cfg.max_images}", "n")
    return generations.size_of(cfg, body.size)


def _start(s: Services, principal: Principal, body: ImageGenerationRequest, width: int,
           height: int) -> tuple[str, str]:
    """The generation recorded and one request per image published; its id and trace id."""
    generation_id, trace_id = f"gen-{uuid.uuid4().hex}", secrets.token_hex(16)
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    requests = generations.requests_of(lambda: [GenerationRequested(
        event_id=f"{generation_id}-{i}", user_id=principal.user_id, event_time=datetime.now(UTC),
        request_id=f"{generation_id}-{i}", prompt=body.prompt, seed=seed + i, num_inference_steps=s.cfg.steps,
        width=width, height=height, style_strength=body.style_strength, style_version=body.style_version,
        style_code=body.style_code, facet=body.facet, partial_images=body.partial_images if body.stream else 0)
        for i in range(body.n)])
    generations.start(s, generation_id, trace_id, requests, lambda: s.store.add_generation(
        generation_id, principal.user_id, principal.grant_id, trace_id, body.prompt, f"{width}x{height}",
        body.response_format, [r.request_id for r in requests]))
    return generation_id, trace_id


async def _wait(s: Services, generation_id: str, timeout_s: float) -> dict:
    """The generation once every image has its result, or as it stands after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        g = await run_in_threadpool(s.store.generation, generation_id)  # the follower may hold the lock
        if g is None:  # the person was forgotten meanwhile
            raise ApiError(404, "not_found", f"generation {generation_id} is gone: its person was forgotten")
        if generations.status(g)[0] != "pending" or time.monotonic() >= deadline:
            return g
        await s.wait_changed(min(1.0, deadline - time.monotonic()))


def images_response(s: Services, g: dict, base_url: str) -> ImagesResponse:
    """The OpenAI-shaped answer for a generation (reads the images for b64_json: run it in a thread)."""
    data = []
    for request_id, result in g["images"]:
        if result is None or result["type"] != "generation_completed":
            continue
        item = ImageData(request_id=request_id, revised_prompt=g["prompt"], style_version=result.get("style_version"),
                         style_code=result.get("style_code"), facet=result.get("facet"))
        if g["response_format"] == "b64_json":
            item.b64_json = base64.b64encode(read_stored(s, result["image_uri"])).decode()
        else:
            expires = int(time.time()) + URL_LIFETIME_S
            item.url = f"{base_url}v1/images/files/{request_id}?expires={expires}&sig={s.sign(request_id, expires)}"
        data.append(item)
    status, failures = generations.status(g)
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
                    png = await run_in_threadpool(read_stored, s, uri)
                    event = {"type": "image_generation.partial_image", "partial_image_index": index,
                             "b64_json": base64.b64encode(png).decode(), "created_at": int(time.time()),
                             "request_id": request_id, **common}
                    yield f"event: image_generation.partial_image\ndata: {json.dumps(event)}\n\n"
            status, failures = generations.status(g) if g else ("failed", ["its person was forgotten"])
            if status == "completed":
                out = await run_in_threadpool(images_response, s, g | {"response_format": "b64_json"}, "")
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

