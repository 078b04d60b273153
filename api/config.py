"""What `stylestream api` is configured with, and where its files live under the data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stylestream.api.auth import TokenVerifier
from stylestream.pipelines.layout import DataLayout


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
    person_images_rate: str = "30/minute"  # images, not requests: n counts
    grant_images_rate: str = "10/minute"
    images: str | None = None  # where the serving worker writes images (serve --output); default DATA_DIR/images

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
