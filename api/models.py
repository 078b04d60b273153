"""The HTTP API's request and response bodies (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from stylestream.api.auth import GRANTABLE
from stylestream.schemas.events import CameraMotion, Id, StyleCode


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "rate_limit_error, timeout_error or server_error, as the OpenAI API names them")
    param: str | None = None
    generation_id: str | None = Field(default=None, description="For a generation that timed out: fetch it later.")


class ErrorBody(BaseModel):
    """Every error, in the OpenAI API's error shape (with the HTTP status repeated)."""

    error: ErrorDetail


class ImageGenerationRequest(BaseModel):
    """OpenAI's `POST /v1/images/generations`, personalized with the signed-in person's style; the
    last five fields are stylestream's own."""

    model_config = ConfigDict(extra="ignore")  # OpenAI parameters with no meaning here (quality, ...)

    prompt: str = Field(min_length=1, max_length=2000)
    n: int = Field(default=1, ge=1, description="Images to make (at most the server's max_images).")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, one the served model draws (see /v1/config).")
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = Field(default=None, description="The calling application's own end-user id, as OpenAI "
                                                       "clients send it; the style is always the token's person's.")
    model: str | None = Field(default=None, description="Accepted and ignored: the served model is the server's.")
    stream: bool = Field(default=False, description="Server-sent events: image_generation.partial_image per "
                                                    "preview, then image_generation.completed per image.")
    partial_images: int = Field(default=0, ge=0, le=3, description="With stream: previews per image while it "
                                                                    "is generated (at most one per step before "
                                                                    "the last).")
    style_strength: float = Field(default=1.0, ge=0.0, le=2.0, description="0 leaves the style out; 1 is its "
                                                                              "full weight.")
    style_version: int | None = Field(default=None, ge=1, description="Pin this version of the person's style.")
    style_code: StyleCode | None = Field(default=None, description="Pin the version with this style code.")
    facet: Literal["auto", "overall"] | Annotated[int, Field(ge=0, le=16)] = Field(
        default="auto", description="auto: the facet nearest the prompt; overall; or a facet's index.")
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    request_id: str
    style_version: int | None = None
    style_code: str | None = None
    facet: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    id: str = Field(description="The generation's id: GET /v1/images/generations/{id} fetches it again.")
    trace_id: str
    status: Literal["completed", "pending", "failed"] = "completed"
    failures: list[str] = Field(default_factory=list)


class StyleLearningSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["user", "album", "photo"]
    id: Id | None = Field(default=None, description="The album or photo id; omitted for scope 'user'.")
    enabled: bool


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="Which application this is for.")
    scopes: list[Literal[GRANTABLE]] = Field(min_length=1, max_length=len(GRANTABLE))  # type: ignore[valid-type]
    expires_in_s: int = Field(default=30 * 86400, ge=60, le=365 * 86400)


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's video job, for a clip in the person's style; the last seven fields are stylestream's own."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(description="0 until the clip is made, then 100.")
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = Field(default=None, description="Clips are kept until deleted or their person forgotten.")
    prompt: str
    seconds: str
    size: str
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    fps: int
    frames: int
    motion: CameraMotion
    started_from_image: bool = Field(description="Whether the clip starts from an image the request gave.")
    style_version: int | None = None
    style_code: str | None = None
    trace_id: str


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
