"""What `stylestream api` is configured with, and where its files live under the data directory."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from stylestream.api.auth import TokenVerifier
from stylestream.pipelines.layout import DataLayout
from stylestream.schemas.events import MAX_CLIP_FRAMES


@dataclass
class ApiConfig:
    bootstrap_servers: str
    data_dir: Path
    verifier: TokenVerifier
    generation_timeout_s: float = 60.0  # how long a request waits for its images before saying so
    sizes: tuple[str, ...] = ("64x64", "128x128", "256x256", "512x512")  # what the served model can draw
    max_images: int = 4  # n, per request
    steps: int = 4  # diffusion steps per image
    max_body_bytes: int = 64 * 1024
    # Rates in `limits` notation, per person (their own sign-in and all their grants together) and per grant.
    person_rate: str = "300/minute"
    grant_rate: str = "120/minute"
    person_images_rate: str = "120/minute"  # images, not requests: n counts, and a clip counts as its frames
    grant_images_rate: str = "40/minute"
    # Where the counts live (a `limits` storage URI): this process's memory, or a Redis that replicas
    # behind one address share (redis://HOST:PORT), so a person's limit is one limit across them.
    rate_limits: str = "memory://"
    replica: str = field(default_factory=lambda: secrets.token_hex(4))  # answers name it (random per process)
    # Clips (POST /v1/videos): their length, frame rate and starting image.
    video_seconds: float = 2.0  # when a request names none
    max_video_seconds: float = 6.0
    video_fps: int = 8  # when a request names none
    max_video_fps: int = 24
    max_reference_bytes: int = 4 * 1024 * 1024  # a starting image, as uploaded
    max_reference_pixels: int = 4096 * 4096
    images: str | None = None  # where the serving worker writes images (serve --output); default DATA_DIR/images

    def video_limits(self) -> dict:
        """What POST /v1/videos accepts (also on /v1/config)."""
        return {"sizes": list(self.sizes), "seconds": self.video_seconds, "max_seconds": self.max_video_seconds,
                "fps": self.video_fps, "max_fps": self.max_video_fps, "max_frames": MAX_CLIP_FRAMES,
                "max_reference_bytes": self.max_reference_bytes, "max_reference_pixels": self.max_reference_pixels}

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def images_url(self) -> str:
        """The only place images are read from, whatever a result event names."""
        return self.images or str(self.layout.images)

    @property
    def db_path(self) -> Path:
        return self.layout.api / "api.sqlite"

    @property
    def url_key_path(self) -> Path:
        return self.layout.api / "url-signing.key"
