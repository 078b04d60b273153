"""What images and videos share: a request becomes generation-requests events under one trace id, and
its answer is the results the follower folds in (one row per request in the `images` table)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from stylestream.api.config import ApiConfig
from stylestream.api.errors import ApiError
from stylestream.api.services import Services, publish_or_503
from stylestream.schemas.events import GenerationRequested, describe_validation_error
from stylestream.streams.topics import GENERATION_REQUESTS


def size_of(cfg: ApiConfig, size: str | None) -> tuple[int, int]:
    """(width, height) of a size the served model draws (the first by default); 400 otherwise."""
    size = size or cfg.sizes[0]
    if size not in cfg.sizes:
        raise ApiError(400, "invalid_size", f"size must be one of {', '.join(cfg.sizes)}", "size")
    width, height = size.split("x")
    return int(width), int(height)


def requests_of(make: Callable[[], list[GenerationRequested]]) -> list[GenerationRequested]:
    """The events `make` builds; a combination the event contract refuses is the caller's 400 (the
    contract has the last word on what a request may combine)."""
    try:
        return make()
    except ValidationError as e:
        raise ApiError(400, "invalid_request", describe_validation_error(e)) from None


def start(s: Services, generation_id: str, trace_id: str, requests: list[GenerationRequested],
          record: Callable[[], None]) -> None:
    """`record` the generation, then publish its requests, all under one trace id; a generation whose
    requests could not be published is recorded as failed, never left pending (a blocking call)."""
    record()
    try:
        publish_or_503(s, GENERATION_REQUESTS, requests, trace_id)
    except ApiError as e:
        s.store.fail_generation(generation_id, e.message)
        raise


def status(g: dict) -> tuple[str, list[str]]:
    """pending, failed or completed, and the reasons of the failed requests."""
    results = [r for _, r in g["images"]]
    failures = [r["reason"] for r in results if r is not None and r["type"] == "generation_failed"]
    return ("pending" if None in results else "failed" if failures else "completed"), failures

