"""Event contracts: what travels on each Kafka topic, as JSON.

Every event carries `schema_version`, a `type` discriminator, an `event_id` (idempotency key), the
`user_id` (also the Kafka message key, so one user's events share a partition) and an aware
`event_time`. Each contract is defined once here; `stylestream schemas export` writes them as JSON
Schema files under schemas/json/ for producers in other languages.
"""

from __future__ import annotations

import base64
import hashlib
import math
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from stylestream.schemas.tables import FEATURE_NAMES

SCHEMA_VERSION = 1
# Photo events normally reference the image; small images may travel inline (base64) up to this size.
MAX_INLINE_BYTES = 256 * 1024

Id = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/-]+$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    user_id: Id
    event_time: AwareDatetime


class ImageRef(BaseModel):
    """Where the photo service keeps an image; the pipeline fetches it, the event never carries pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, max_length=2048, description="file://, or any fsspec URL")
    sha256: Sha256
    size_bytes: int = Field(gt=0)
    content_type: Literal["image/jpeg", "image/png", "image/webp", "image/heic", "image/heif"] | None = Field(
        default=None, description="If given, the bytes must be of this format.")
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)


class PhotoUploaded(_Event):
    type: Literal["photo_uploaded"] = "photo_uploaded"
    photo_id: Id
    album_id: Id | None = None
    taken_at: AwareDatetime | None = Field(
        default=None, description="When the photo was taken; weights the photo in time. Defaults to event_time. "
        "Ingestion keeps only its day (UTC), the precision the weighting needs.")
    taken_at_zone_known: bool = Field(
        default=True, description="False when the camera recorded a local time without its time zone: "
        "taken_at is then that local day, labelled UTC (off by less than a day).")
    image: ImageRef | None = None
    renditions: list[ImageRef] = Field(
        default_factory=list,
        description="Smaller versions the photo service already keeps (with width/height); the smallest "
        "one large enough is decoded instead of the original.",
    )
    inline_base64: str | None = Field(
        default=None, description=f"Small images only: the file bytes, base64, at most {MAX_INLINE_BYTES} bytes."
    )

    @field_validator("inline_base64")
    @classmethod
    def _inline_small(cls, v: str | None) -> str | None:
        if v is not None and len(v) * 3 // 4 > MAX_INLINE_BYTES:
            raise ValueError(f"inline image larger than {MAX_INLINE_BYTES} bytes; reference it by uri instead")
        return v

    @model_validator(mode="after")
    def _has_image(self) -> PhotoUploaded:
        if self.image is None and self.inline_base64 is None:
            raise ValueError("a photo needs `image` (a reference) or `inline_base64`")
        return self

    @property
    def effective_taken_at(self) -> datetime:
        return self.taken_at or self.event_time

    def inline_bytes(self) -> bytes | None:
        return None if self.inline_base64 is None else base64.b64decode(self.inline_base64, validate=True)


class DeviceBasis(BaseModel):
    """What a device computed a photo's contribution with: the part of a style's basis that touches
    pixels (ingestion refuses a contribution whose basis is not its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200, description="open_clip architecture")
    weights: str = Field(min_length=1, max_length=200, description="the weights id, as style manifests name it")
    preprocessing: str = Field(min_length=1, max_length=200, description="decoding and masking, versioned")


UNIT_TOLERANCE = 1e-3  # how far from length 1 a device's embedding may be (float32 rounding is far less)


class DeviceContribution(BaseModel):
    """What a device sends of one photo (`stylestream device sync`, POST /v1/me/contributions): what a
    style needs of it, computed with ingestion's own code, and nothing else; never a pixel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    photo_id: Id
    album_id: Id | None = None
    taken_at: AwareDatetime = Field(description="The day the photo was taken (00:00 UTC): all a style keeps.")
    sha256: Sha256 = Field(description="of the photo's file, as the person holds it")
    size_bytes: int = Field(gt=0)
    embedding: list[float] = Field(min_length=1, max_length=4096, description="L2-normalized image embedding")
    features: dict[str, float] = Field(description="the named aesthetic features (transforms/features.py)")
    basis: DeviceBasis

    @field_validator("taken_at")
    @classmethod
    def _day(cls, v: datetime) -> datetime:
        """Only the day travels, whatever a client sends."""
        day = v.astimezone(UTC)
        return datetime(day.year, day.month, day.day, tzinfo=UTC)

    @field_validator("embedding")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("a value is not finite")
        if abs(math.sqrt(sum(x * x for x in v)) - 1) > UNIT_TOLERANCE:
            raise ValueError("the embedding is not of unit length")
        return v

    @field_validator("features")
    @classmethod
    def _named(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(FEATURE_NAMES):
            missing, unknown = sorted(set(FEATURE_NAMES) - set(v)), sorted(set(v) - set(FEATURE_NAMES))
            raise ValueError(f"the features must be exactly the named ones (missing {missing}, unknown {unknown})")
        if not all(math.isfinite(x) for x in v.values()):
            raise ValueError("a feature is not finite")
        return v

    def as_event(self, user_id: str, at: datetime) -> PhotoEmbedded:
        """As the photo-events event of `user_id` (the signed-in person: a device speaks for no one else),
        with one event id per person, photo and file: sending it again is the same event."""
        event_id = "device-" + hashlib.sha256(f"{user_id}\n{self.photo_id}\n{self.sha256}".encode()).hexdigest()[:32]
        return PhotoEmbedded(event_id=event_id, user_id=user_id, event_time=at, **self.model_dump())


class PhotoEmbedded(_Event, DeviceContribution):
    """A photo analysed on the person's device: its `DeviceContribution`, under the person's id. The
    photo itself never leaves the device."""

    type: Literal["photo_embedded"] = "photo_embedded"

    @property
    def effective_taken_at(self) -> datetime:
        return self.taken_at


class PhotoDeleted(_Event):
    type: Literal["photo_deleted"] = "photo_deleted"
    photo_id: Id


class StyleLearningToggled(_Event):
    """Style learning switched on or off for the whole user, one album or one photo.

    The latest toggle by `event_time` wins for its scope, whatever order toggles arrive in. A photo
    counts only while no scope that covers it (user, its album, itself) is switched off.
    """

    type: Literal["style_learning_toggled"] = "style_learning_toggled"
    scope: Literal["user", "album", "photo"]
    scope_id: Id | None = Field(default=None, description="album_id or photo_id; omitted for scope 'user'")
    enabled: bool

    @model_validator(mode="after")
    def _scope_id_matches(self) -> StyleLearningToggled:
        if self.scope == "user" and self.scope_id not in (None, self.user_id):
            raise ValueError("scope 'user' takes no scope_id (or the user_id itself)")
        if self.scope != "user" and self.scope_id is None:
            raise ValueError(f"scope '{self.scope}' needs scope_id (the {self.scope} id)")
        return self


class UserForgotten(_Event):
    """Forget the person: every record of them in every store the project writes is deleted, once,
    and a signed erasure receipt (by this event's id) says what was deleted."""

    type: Literal["user_forgotten"] = "user_forgotten"


def is_forget_request(event: object) -> bool:
    """The one test of "forget this person", for every runner, the grouping of a cycle and the API."""
    return isinstance(event, UserForgotten)


StyleCode = Annotated[str, Field(pattern=r"^sc1-[0-9a-f]{40}$", description="A style version's code: the hash "
                                 "of its manifest's basis and photos (schemas/manifests.py)")]


MAX_CLIP_FRAMES = 48
CameraMotion = Literal["none", "pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out"]


class ClipRequest(BaseModel):
    """A short clip instead of a still: every frame in the person's style (serving/clips.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    frames: int = Field(ge=2, le=MAX_CLIP_FRAMES)
    fps: int = Field(default=8, ge=1, le=30)
    motion: CameraMotion = Field(default="none", description="the camera's motion over the clip")
    start_image_uri: str | None = Field(
        default=None, max_length=2000, description="An image to start from, in the image store (the API writes "
        "it there, checked and re-encoded): the first frame is it, redrawn in the person's style.")


class GenerationRequested(_Event):
    type: Literal["generation_requested"] = "generation_requested"
    request_id: Id
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    seed: int = Field(default=0, ge=0, lt=2**63)
    num_inference_steps: int = Field(default=4, ge=1, le=200)
    guidance_scale: float = Field(default=0.0, ge=0.0, le=30.0)
    width: int = Field(default=64, ge=16, le=2048, multiple_of=8)
    height: int = Field(default=64, ge=16, le=2048, multiple_of=8)
    style_strength: float = Field(default=1.0, ge=0.0, le=2.0)
    style_version: int | None = Field(default=None, ge=1, description="Pin this exact version of the style.")
    style_code: StyleCode | None = Field(default=None, description="Pin the style version with this code.")
    min_style_version: int | None = Field(
        default=None, ge=1, description="Read-your-writes: use the latest style, but at least this version "
        "(the worker waits a bounded time for it to arrive).")
    facet: Literal["auto", "overall"] | Annotated[int, Field(ge=0)] = Field(
        default="auto", description="'auto': the facet closest to the prompt; 'overall'; or a facet index.")
    style_layers_only: bool = Field(
        default=False, description="Inject the style only into the style layers (as InstantStyle does), "
        "leaving layout and content to the prompt.")
    allow_unpersonalized: bool = Field(
        default=False, description="If the user has no style yet, generate without one instead of failing."
    )
    partial_images: int = Field(
        default=0, ge=0, le=3, description="Previews published while generating (generation_progress), evenly "
        "spaced over the steps; at most one per step before the last.")

    clip: ClipRequest | None = Field(default=None, description="Make a short clip (an MP4) instead of an image.")

    @model_validator(mode="after")
    def _one_pin(self) -> GenerationRequested:
        if self.style_version is not None and self.style_code is not None:
            raise ValueError("pin a style by style_version or by style_code, not both")
        if self.clip is not None and self.partial_images:
            raise ValueError("a clip has no partial images")
        return self

    @property
    def rows(self) -> int:
        """Rows of a diffusion batch the request takes: its frames."""
        return self.clip.frames if self.clip else 1


class GenerationCompleted(_Event):
    type: Literal["generation_completed"] = "generation_completed"
    request_id: Id
    image_uri: str
    style_version: int | None = Field(
        default=None, description="The style version that conditioned the image; null if none.")
    style_code: StyleCode | None = Field(
        default=None, description="That version's code: its manifest names the photos behind the image.")
    facet: int | None = Field(default=None, description="The facet used; null for the overall style.")
    lora: bool = Field(default=False, description="Whether a LoRA adapter was applied: the user's own, or the "
                                             "hyper-LoRA's for their style.")
    style_strength: float
    seed: int
    frames: int | None = Field(default=None, description="A clip's frame count (image_uri is its MP4); null "
                               "for an image.")
    timings_ms: dict[str, float] = Field(default_factory=dict)


class GenerationFailed(_Event):
    type: Literal["generation_failed"] = "generation_failed"
    request_id: Id
    reason: str


class GenerationProgress(_Event):
    """A preview of an image still being generated (the request asked for `partial_images`)."""

    type: Literal["generation_progress"] = "generation_progress"
    request_id: Id
    partial_image_index: int = Field(ge=0, description="0, 1, ... in the order they were made")
    step: int = Field(ge=1, description="denoising steps done when it was decoded")
    image_uri: str


class StyleFacet(BaseModel):
    """One of a user's distinct tastes: the time-weighted mean of the photos in it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    photo_count: int = Field(ge=1)
    weight_share: float = Field(ge=0.0, le=1.0)
    embedding: list[float]
    features: dict[str, float]


class ErasedRequest(BaseModel):
    """A forget request an erasure answers: its id (random, names no one) and when it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Id
    requested_at: AwareDatetime


class ErasureNotice(BaseModel):
    """On a forgotten person's tombstone event: the requests it answers and what ingestion's state
    deleted. Whoever keeps the rest of the person's data (the history writer for the streaming
    runners) erases it on reading this, then signs the receipts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: list[ErasedRequest] = Field(min_length=1)
    deleted: dict[str, int] = Field(description="kind of data in ingestion's state -> records deleted")


class StyleVectorUpdated(_Event):
    """A new immutable version of a user's style: keyed by user on the style-vectors topic."""

    type: Literal["style_vector_updated"] = "style_vector_updated"
    version: int = Field(ge=1)
    photo_count: int = Field(ge=0)
    total_weight: float | None = Field(default=None, ge=0.0, description="the sum of the photos' time weights "
                                       "(the history's total_weight)")
    embedding: list[float] = Field(description="L2-normalized, time-weighted mean image embedding")
    features: dict[str, float] = Field(description="time-weighted mean of the named aesthetic features")
    facets: list[StyleFacet] = Field(default_factory=list, description="distinct tastes, largest first")
    style_code: StyleCode | None = Field(
        default=None, description="the code of this version's manifest (on style-manifests): the same photos "
        "give the same code")
    tombstone: bool = Field(default=False, description="True on the last event of a person who asked to be "
                            "forgotten (a null-value tombstone for their key follows): drop them")
    withdrawn_versions: list[int] = Field(
        default_factory=list, description="earlier versions that counted photos since withdrawn: no longer to be used")
    erasure: ErasureNotice | None = Field(default=None, description="on a tombstone: the forget requests it "
                                          "answers and what ingestion's state deleted")


class StyleBasis(BaseModel):
    """What, besides the photos, a style vector is computed from: with the photos, its whole recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="open_clip architecture")
    weights: str = Field(description="sha256:<hex> of the checkpoint file, open_clip:<tag>, or random:seed0")
    half_life_days: float
    preprocessing: str = Field(description="decode and masking steps, versioned (transforms/pixels.py)")


class ManifestPhoto(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    photo_id: Id
    sha256: Sha256 | None = Field(description="of the photo's file as uploaded; null for photos stored "
                                  "before manifests existed")
    weight: float = Field(gt=0, description="its time-decay weight in the mean")
    album_id: Id | None = None
    computed_on: Literal["server", "device"] = Field(
        default="server", description="where its embedding and features were computed: by ingestion, or on "
        "the person's device (photo_embedded; the photo never reached the server)")


class Pull(BaseModel):
    """How much one photo moves one part of the style: its share of the weighted mean's deviation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    photo_id: Id
    album_id: Id | None = None
    pull: float


class FeaturePulls(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    raises: list[Pull]
    lowers: list[Pull]


class FacetPulls(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    photo_count: int
    typical: list[Pull] = Field(description="the facet's photos closest to it, weighted")


class Explanation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    overall: list[Pull] = Field(description="photos that pull the overall embedding most toward themselves")
    features: dict[str, FeaturePulls] = Field(description="per named feature, the photos raising and lowering it")
    facets: list[FacetPulls]


class StyleManifest(_Event):
    """What one style version was computed from, keyed by user on the style-manifests topic. Its
    `style_code` is the hash of `basis` and `photos` alone (transforms/manifest.py): anyone holding the
    photos can recompute the vector (`stylestream verify`) and see which photos count."""

    type: Literal["style_manifest"] = "style_manifest"
    version: int = Field(ge=1)
    style_code: StyleCode
    basis: StyleBasis
    photos: list[ManifestPhoto] = Field(description="the photos that count, sorted by photo_id")
    embedding: list[float] = Field(description="the version's published style embedding")
    embedding_norm: float = Field(ge=0, description="the norm of the weighted mean before it was normalized "
                                  "(bounds what one photo can change: privacy/release.py)")
    features: dict[str, float]
    explanation: Explanation


class ErasureReceipt(BaseModel):
    """What forgetting a person deleted, signed by the service (Ed25519). Names the request by its
    event id only: no user id, no pseudonym, nothing the requester does not already know."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["stylestream-erasure-receipt/1"] = "stylestream-erasure-receipt/1"
    request_event_id: Id
    requested_at: AwareDatetime
    completed_at: AwareDatetime
    deleted: dict[str, dict[str, int]] = Field(description="store -> kind of data -> how many records")
    pending: dict[str, str] = Field(description="store -> what still waits, and until when (compaction)")
    key_id: str = Field(description="sha256 of the signing public key (raw bytes), hex")
    signature: str = Field(default="", description="base64 Ed25519 signature of the receipt without it")


PhotoEvent = Annotated[PhotoUploaded | PhotoEmbedded | PhotoDeleted, Field(discriminator="type")]
ConsentEvent = Annotated[StyleLearningToggled | UserForgotten, Field(discriminator="type")]
# generation-results carries each request's outcome, and the previews it asked for before that.
GenerationResult = Annotated[GenerationCompleted | GenerationFailed | GenerationProgress, Field(discriminator="type")]

# One contract per topic; the JSON Schema export is generated from this table.
TOPIC_CONTRACTS: dict[str, object] = {
    "photo-events": PhotoEvent,
    "consent-events": ConsentEvent,
    "generation-requests": GenerationRequested,
    "generation-results": GenerationResult,
    "style-vectors": StyleVectorUpdated,
    "style-manifests": StyleManifest,
    "erasure-receipts": ErasureReceipt,
}
_ADAPTERS = {topic: TypeAdapter(contract) for topic, contract in TOPIC_CONTRACTS.items()}


class InvalidEvent(ValueError):
    """Raised for bytes that are not a valid event of the topic's contract; the message is the reason."""


def describe_validation_error(err: ValidationError) -> str:
    """One readable line per problem, each naming the field: `image.sha256: String should match ...`."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(event)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_event(topic: str, value: bytes):
    """Validate raw message bytes against `topic`'s contract and return the typed event."""
    try:
        adapter = _ADAPTERS[topic]
    except KeyError:
        raise InvalidEvent(f"no contract for topic {topic!r}") from None
    if not value:
        raise InvalidEvent("empty message")
    try:
        return adapter.validate_json(value)
    except ValidationError as err:
        raise InvalidEvent(describe_validation_error(err)) from None


def encode_event(event: BaseModel) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def to_message(event: _Event) -> tuple[bytes, bytes]:
    """An event as a Kafka message: (key, value). Every topic is keyed by user id."""
    return event.user_id.encode(), encode_event(event)


def json_schemas() -> dict[str, dict]:
    """The JSON Schema of every topic's contract, keyed by topic."""
    out = {}
    for topic, adapter in _ADAPTERS.items():
        schema = adapter.json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = f"stylestream {topic} event (schema_version {SCHEMA_VERSION})"
        out[topic] = schema
    return out
