"""The generation worker: generation-requests joined with style vectors -> images + result events.

Workers form one consumer group, so adding workers scales out. Each request's outcome is stored next
to its image (`<request_id>.json`); a redelivered request republishes that outcome instead of
generating a second image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec

from stylestream.schemas.events import (
    GenerationCompleted,
    GenerationFailed,
    GenerationRequested,
    InvalidEvent,
    encode_event,
    parse_event,
)
from stylestream.serving.generator import StyleGenerator
from stylestream.serving.style_table import StyleTable
from stylestream.streams import clients
from stylestream.streams.topics import GENERATION_REQUESTS, GENERATION_RESULTS, dlq, ensure_topics
from stylestream.transforms.records import DeadLetter

log = logging.getLogger(__name__)
GROUP_ID = "stylestream-serve"

Result = GenerationCompleted | GenerationFailed


@dataclass
class ServeConfig:
    bootstrap_servers: str
    output_url: str  # a local folder or any fsspec URL
    group_id: str = GROUP_ID


class OutputStore:
    """Images and their result records under one fsspec URL, by user and request id."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, request: GenerationRequested, ext: str) -> str:
        return f"{self.root}/{request.user_id}/{request.request_id}.{ext}"

    def existing_result(self, request: GenerationRequested) -> Result | None:
        path = self._path(request, "json")
        if not self.fs.exists(path):
            return None
        return parse_event(GENERATION_RESULTS, self.fs.cat_file(path))

    def save(self, request: GenerationRequested, image, make_result: Callable[[str], Result]) -> Result:
        png = self._path(request, "png")
        self.fs.makedirs(png.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(png, "wb") as f:
            image.save(f, "PNG")
        return self.record(request, make_result(self.fs.unstrip_protocol(png)))

    def record(self, request: GenerationRequested, result: Result) -> Result:
        self.fs.makedirs(f"{self.root}/{request.user_id}", exist_ok=True)
        self.fs.pipe_file(self._path(request, "json"), encode_event(result))
        return result


class Worker:
    def __init__(self, cfg: ServeConfig, generator: StyleGenerator):
        ensure_topics(cfg.bootstrap_servers)
        self.generator = generator
        self.output = OutputStore(cfg.output_url)
        self.styles = StyleTable(cfg.bootstrap_servers)
        self.styles.catch_up()
        self._producer = clients.producer(cfg.bootstrap_servers)
        self._requests = clients.consumer(cfg.bootstrap_servers, group_id=cfg.group_id)
        self._requests.subscribe([GENERATION_REQUESTS])

    def close(self) -> None:
        for c in (self._requests, self.styles, self._producer):
            c.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, max_requests: int | None = None, idle_exit_s: float | None = None,
            on_result: Callable[[Result], None] | None = None) -> int:
        """Serve until `max_requests` were handled or nothing arrived for `idle_exit_s` (forever if None)."""
        handled, idle_since = 0, time.monotonic()
        while max_requests is None or handled < max_requests:
            batches = self._requests.poll(timeout_ms=clients.POLL_MS)
            self.styles.poll()
            if not batches:
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                continue
            for records in batches.values():
                for r in records:
                    result = self.handle(r)
                    if result is not None and on_result:
                        on_result(result)
                    handled += 1
            self._producer.flush()
            self._requests.commit()  # after the results are out: a crash redelivers, never loses
            idle_since = time.monotonic()
        return handled

    def handle(self, record) -> Result | None:
        try:
            request = parse_event(GENERATION_REQUESTS, record.value or b"")
        except InvalidEvent as e:
            dead = DeadLetter(record.topic, record.partition, record.offset, record.key, record.value,
                              "validate", str(e))
            self._producer.send(dlq(GENERATION_REQUESTS), key=record.key, value=dead.to_json())
            return None
        result = self.output.existing_result(request) or self._generate(request)
        self._producer.send(GENERATION_RESULTS, key=request.user_id.encode(), value=encode_event(result))
        return result

    def _generate(self, request: GenerationRequested) -> Result:
        style = self.styles.get(request.user_id, request.style_version)
        if style is None and (request.style_version is not None or not request.allow_unpersonalized):
            what = f"style version {request.style_version}" if request.style_version else "no style vector yet"
            return self.output.record(request, _failed(request, f"user {request.user_id}: {what} "
                                                                "(set allow_unpersonalized to generate without)"))
        t0 = time.perf_counter()
        try:
            image, facet = self.generator.generate(request, style)
        except (ValueError, RuntimeError) as e:  # bad parameters for this model, out of memory
            log.exception("generation failed for %s", request.request_id)
            return self.output.record(request, _failed(request, f"{type(e).__name__}: {e}"))
        ms = (time.perf_counter() - t0) * 1000
        return self.output.save(request, image, lambda uri: GenerationCompleted(
            event_id=f"done-{request.request_id}", user_id=request.user_id, event_time=datetime.now(UTC),
            request_id=request.request_id, image_uri=uri, style_version=style.version if style else None,
            facet=facet,
            style_strength=request.style_strength if style else 0.0, seed=request.seed,
            timings_ms={"generate": round(ms, 1)}))


def _failed(request: GenerationRequested, reason: str) -> GenerationFailed:
    return GenerationFailed(event_id=f"failed-{request.request_id}", user_id=request.user_id,
                            event_time=datetime.now(UTC), request_id=request.request_id, reason=reason)
