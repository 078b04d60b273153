"""`/v1/videos`: OpenAI's Videos API, for short clips in the signed-in person's style.

A clip is one generation request (serving/clips.py makes it); creating one answers at once with the
job `queued`, and the client polls it until `completed` or `failed`, then downloads the MP4. A clip
may start from an image (`input_reference`: an upload, or a data: URL), checked by ingestion's
decoding rules, re-encoded as PNG (nothing of its metadata kept) and written to the person's folder
of the image store, where forgetting them deletes it. A request beyond the limits costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import math
import random
import secrets
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from stylestream.api import generations
from stylestream.api.auth import IMAGES_GENERATE, Principal
from stylestream.api.config import ApiConfig
from stylestream.api.errors import ApiError
from stylestream.api.models import ErrorBody, Video, VideoDeleted, VideoError, VideoList
from stylestream.api.services import ERRORS, Caller, Services, charge, read_stored, services_of
from stylestream.schemas.events import MAX_CLIP_FRAMES, CameraMotion, ClipRequest, GenerationRequested
from stylestream.serving.image_store import png_bytes
from stylestream.transforms.pixels import DecodeLimits, PhotoError, decode_pillow

VIDEO_MODEL = "stylestream-clip"  # what `model` says: the served image model, making clips
STATUS = {"pending": "queued", "completed": "completed", "failed": "failed"}
POLL_AFTER = {"openai-poll-after-ms": "250"}  # how often OpenAI's clients poll a clip being made
router = APIRouter(tags=["videos"])


@router.post("/v1/videos", response_model=Video, responses={**ERRORS, 503: {"model": ErrorBody}})
async def create_video(
    request: Request, response: Response, principal: Caller,
    prompt: Annotated[str, Form(min_length=1, max_length=2000, description="What the clip shows.")],
    seconds: Annotated[str | None, Form(description="Its length (OpenAI's clients send \"4\"); at most the "
                                                    "server's max_seconds (see /v1/config).")] = None,
    size: Annotated[str | None, Form(description="WIDTHxHEIGHT, one the served model draws.")] = None,
    model: Annotated[str | None, Form(description="Accepted and ignored: the served model is the server's.")] = None,
    fps: Annotated[int | None, Form(ge=1, description="Frames per second (at most the server's max_fps).")] = None,
    motion: Annotated[CameraMotion, Form(description="The camera's motion over the clip.")] = "none",
    style_strength: Annotated[float, Form(ge=0.0, le=2.0, description="0 leaves the style out.")] = 1.0,
    seed: Annotated[int | None, Form(ge=0, lt=2**63)] = None,
    input_reference: Annotated[UploadFile | None, File(description="An image to start from.")] = None,
    reference_url: Annotated[str | None, Form(alias="input_reference[image_url]", description=(
        "An image to start from, as a data: URL (nothing is fetched from elsewhere)."))] = None,
    reference_file_id: Annotated[str | None, Form(alias="input_reference[file_id]", description=(
        "Not kept here: refused with a message saying so."))] = None,
) -> Video:
    """Start a clip in the caller's style; answers at once (`queued`): poll GET /v1/videos/{id}."""
    s = services_of(request)
    principal.require(IMAGES_GENERATE)
    # 1. Everything checked before anything is spent: size, length, frame rate, the starting image
    width, height = generations.size_of(s.cfg, size)
    fps, frames = _timing(s.cfg, seconds, fps)
    reference = await _reference_bytes(s.cfg, input_reference, reference_url, reference_file_id)
    start = await run_in_threadpool(_starting_image, s.cfg, *reference, width, height) if reference else None
    # 2. The clip counts as its frames against the image limits
    charge(s, principal, s.cfg.person_images_rate, s.cfg.grant_images_rate, "images", cost=frames)
    # 3. Recorded, its starting image stored, its request published
    clip = {"prompt": prompt, "size": f"{width}x{height}", "seconds": f"{frames / fps:g}", "fps": fps,
            "frames": frames, "motion": motion, "started_from_image": start is not None}
    video_id = await run_in_threadpool(_start, s, principal, clip, (width, height), style_strength, seed, start)
    response.headers.update(POLL_AFTER)
    return video_object(await run_in_threadpool(s.store.video, video_id))


@router.get("/v1/videos", response_model=VideoList, responses=ERRORS)
def list_videos(request: Request, principal: Caller, after: str | None = None, limit: int = 20,
                order: Literal["asc", "desc"] = "desc") -> VideoList:  # OpenAI's parameter names
    """The caller's clips, newest first (or oldest, with order=asc), `limit` (1-100) at a time."""
    principal.require(IMAGES_GENERATE)
    if not 1 <= limit <= 100:
        raise ApiError(400, "invalid_limit", "limit must be 1 to 100", "limit")
    rows = services_of(request).store.videos_of(principal.user_id, limit + 1, after, newest_first=order == "desc")
    data = [video_object(v) for v in rows[:limit]]
    return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=len(rows) > limit)


@router.get("/v1/videos/{video_id}", response_model=Video, responses=ERRORS)
def retrieve_video(video_id: str, request: Request, response: Response, principal: Caller) -> Video:
    """A clip's job: queued until it is made, then completed (or failed, with the reason)."""
    principal.require(IMAGES_GENERATE)
    response.headers.update(POLL_AFTER)
    return video_object(_own(services_of(request), principal, video_id))


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={**ERRORS, 409: {"model": ErrorBody}})
def delete_video(video_id: str, request: Request, principal: Caller) -> VideoDeleted:
    """Delete a completed or failed clip: its MP4, its result and its starting image."""
    principal.require(IMAGES_GENERATE)
    s = services_of(request)
    v = _own(s, principal, video_id)
    if generations.status(v)[0] == "pending":
        raise ApiError(409, "video_in_progress", f"video {video_id} is still being made; delete it once it is "
                       "completed or failed")
    s.images.delete_request(principal.user_id, video_id)
    s.store.delete_video(principal.user_id, video_id)
    return VideoDeleted(id=video_id)


@router.get("/v1/videos/{video_id}/content", response_class=Response,
            responses={**ERRORS, 409: {"model": ErrorBody}, 200: {"content": {"video/mp4": {}}}})
def video_content(video_id: str, request: Request, principal: Caller,
                  variant: Literal["video", "thumbnail", "spritesheet"] = "video") -> Response:
    """The clip as H.264 MP4."""
    principal.require(IMAGES_GENERATE)
    if variant != "video":
        raise ApiError(400, "unsupported_variant", f"only the video variant is served, not {variant}", "variant")
    s = services_of(request)
    v = _own(s, principal, video_id)
    state, failures = generations.status(v)
    if state != "completed":
        reason = f"it failed: {'; '.join(failures)}" if state == "failed" else "it is still being made"
        raise ApiError(409, "video_not_ready", f"video {video_id} has no content: {reason}")
    return Response(read_stored(s, v["images"][0][1]["image_uri"]), media_type="video/mp4",
                    headers={"Cache-Control": "private, max-age=3600"})


def _timing(cfg: ApiConfig, seconds: str | None, fps: int | None) -> tuple[int, int]:
    """(frames per second, frames) within the configured limits; 400 with the limit otherwise."""
    fps = fps or min(cfg.video_fps, cfg.max_video_fps)  # the defaults within the limits a server sets
    if fps > cfg.max_video_fps:
        raise ApiError(400, "invalid_fps", f"fps must be at most {cfg.max_video_fps}", "fps")
    try:
        length = float(seconds) if seconds is not None else min(cfg.video_seconds, cfg.max_video_seconds)
    except ValueError:
        raise ApiError(400, "invalid_seconds", f"seconds must be a number, not {seconds!r}", "seconds") from None
    if not math.isfinite(length) or not 0 < length <= cfg.max_video_seconds:
        raise ApiError(400, "invalid_seconds", f"seconds must be above 0 and at most {cfg.max_video_seconds:g}",
                       "seconds")
    frames = round(length * fps)
    if not 2 <= frames <= MAX_CLIP_FRAMES:
        raise ApiError(400, "invalid_seconds", f"{length:g} s at {fps} fps is {frames} frames; a clip has 2 to "
                       f"{MAX_CLIP_FRAMES} (at {fps} fps, at most {MAX_CLIP_FRAMES / fps:g} s)", "seconds")
    return fps, frames


async def _reference_bytes(cfg: ApiConfig, upload: UploadFile | None, url: str | None,
                           file_id: str | None) -> tuple[bytes, str | None] | None:
    """The starting image's bytes as given (an upload or a data: URL), at most max_reference_bytes, and
    the content type they were declared as."""
    if sum(x is not None for x in (upload, url, file_id)) > 1:
        raise ApiError(400, "invalid_input_reference", "give one input_reference: a file, or an image_url",
                       "input_reference")
    if file_id is not None:
        raise ApiError(400, "invalid_input_reference", "input_reference.file_id: this service keeps no files; "
                       "upload the image, or give it as a data: URL", "input_reference")
    if url is not None:
        header, _, payload = url.partition(",")
        if not (header.startswith("data:") and header.endswith(";base64")):
            raise ApiError(400, "invalid_input_reference", "input_reference.image_url must be a base64 data: URL "
                           "(this service fetches nothing from elsewhere); or upload the image", "input_reference")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_input_reference", "input_reference.image_url is not valid base64",
                           "input_reference") from None
        declared = header.removeprefix("data:").removesuffix(";base64") or None
    elif upload is not None:
        data, declared = await upload.read(cfg.max_reference_bytes + 1), upload.content_type
    else:
        return None
    if len(data) > cfg.max_reference_bytes:
        raise ApiError(413, "input_reference_too_large", f"input_reference is over {cfg.max_reference_bytes} bytes",
                       "input_reference")
    return data, declared


def _starting_image(cfg: ApiConfig, data: bytes, content_type: str | None, width: int, height: int) -> bytes:
    """The starting image decoded by ingestion's rules (formats, the declared type, pixel limit,
    orientation, colour), small, as PNG: pixels only, none of its metadata. 400 with the reason if it
    is not a usable image."""
    limits = DecodeLimits(max_pixels=cfg.max_reference_pixels, min_side=max(width, height))
    try:
        image, _ = decode_pillow(data, limits, content_type)
    except PhotoError as e:
        raise ApiError(400, "invalid_input_reference", f"input_reference: {e}", "input_reference") from None
    return png_bytes(image)


def _start(s: Services, principal: Principal, clip: dict, size: tuple[int, int], style_strength: float,
           seed: int | None, start: bytes | None) -> str:
    """The clip recorded, its starting image stored and its request published; its id."""
    video_id, trace_id = f"video_{uuid.uuid4().hex}", secrets.token_hex(16)
    width, height = size
    reference = s.images.reference_path(principal.user_id, video_id) if start else None
    requests = generations.requests_of(lambda: [GenerationRequested(
        event_id=video_id, user_id=principal.user_id, event_time=datetime.now(UTC), request_id=video_id,
        prompt=clip["prompt"], seed=seed if seed is not None else random.randrange(2**31),
        num_inference_steps=s.cfg.steps, width=width, height=height, style_strength=style_strength,
        clip=ClipRequest(frames=clip["frames"], fps=clip["fps"], motion=clip["motion"],
                         start_image_uri=s.images.uri(reference) if reference else None))])
    if reference:
        s.images.write(reference, start)
    generations.start(s, video_id, trace_id, requests, lambda: s.store.add_video(
        {"id": video_id, "trace_id": trace_id, **clip}, principal.user_id, principal.grant_id))
    return video_id


def _own(s: Services, principal: Principal, video_id: str) -> dict:
    v = s.store.video(video_id)
    if v is None or v["user_id"] != principal.user_id:
        raise ApiError(404, "not_found", f"no video {video_id} of yours")
    return v


def video_object(v: dict) -> Video:
    """A stored clip in OpenAI's video shape."""
    state, failures = generations.status(v)
    result = v["images"][0][1] or {}
    done_at = result.get("event_time")
    return Video(
        id=v["id"], model=VIDEO_MODEL, status=STATUS[state], progress=0 if state == "pending" else 100,
        created_at=_unix(v["created_at"]), completed_at=_unix(done_at) if done_at else None, prompt=v["prompt"],
        seconds=v["seconds"], size=v["size"], fps=v["fps"], frames=v["frames"], motion=v["motion"],
        started_from_image=bool(v["started_from_image"]), style_version=result.get("style_version"),
        style_code=result.get("style_code"), trace_id=v["trace_id"],
        error=VideoError(code="generation_failed", message="; ".join(failures)) if state == "failed" else None)


def _unix(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())
