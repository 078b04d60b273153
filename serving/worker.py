"""The generation worker: generation-requests joined with style vectors -> images + result events.

Workers form one consumer group, so adding workers scales out. Each request's outcome is stored next
to its image (`<request_id>.json`); a redelivered request republishes that outcome instead of
generating a second image.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import av
from PIL import Image, ImageOps

from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import (
    GenerationCompleted,
    GenerationFailed,
    GenerationProgress,
    GenerationRequested,
    InvalidEvent,
    StyleVectorUpdated,
    encode_event,
    parse_event,
)
from stylestream.serving.clips import encode_mp4
from stylestream.serving.generator import Conditioning, StyleGenerator, batch_key
from stylestream.serving.image_store import ImageStore, NotInStore, png_bytes
from stylestream.serving.metrics import ServeMetrics
from stylestream.serving.style_table import StyleTable
from stylestream.streams import clients
from stylestream.streams.topics import GENERATION_REQUESTS, GENERATION_RESULTS, ensure_topics

log = logging.getLogger(__name__)
GROUP_ID = "stylestream-serve"

Result = GenerationCompleted | GenerationFailed


@dataclass(frozen=True)
class Job:
    """A request that passed its checks, with the style and conditioning it will be generated with."""

    request: GenerationRequested
    style: StyleVectorUpdated | None
    cond: Conditioning


@dataclass
class ServeConfig:
    bootstrap_servers: str
    output_url: str  # a local folder or any fsspec URL
    group_id: str = GROUP_ID
    max_batch: int = 8  # requests per diffusion call, across users
    max_wait_ms: int = 50  # how long a first request waits for others to share its call
    style_wait_ms: int = 5000  # how long a request waits for a pinned or minimum style version


class OutputStore:
    """What the worker keeps in the image store: each request's image or clip and its result record
    (a redelivered request is answered from it), previews, and reading a clip's starting image."""

    def __init__(self, url: str):
        self.store = ImageStore(url)

    def existing_result(self, request: GenerationRequested) -> Result | None:
        path = self.store.path(request.user_id, request.request_id, "json")
        if not self.store.fs.exists(path):
            return None
        return parse_event(GENERATION_RESULTS, self.store.fs.cat_file(path))

    def save(self, request: GenerationRequested, output: Image.Image | list[Image.Image],
             make_result: Callable[[str], Result]) -> Result:
        """An image as PNG, or a clip's frames as MP4 (av.FFmpegError or ValueError if they cannot be
        encoded), then its result record."""
        data = encode_mp4(output, request.clip.fps) if request.clip else png_bytes(output)
        uri = self.store.write(self.store.path(request.user_id, request.request_id,
                                               "mp4" if request.clip else "png"), data)
        return self.record(request, make_result(uri))

    def save_preview(self, request: GenerationRequested, index: int, image: Image.Image) -> str:
        """A preview of an image still being generated, beside where the image will be; its URI."""
        return self.store.write(self.store.path(request.user_id, request.request_id, f"partial-{index}.png"),
                                png_bytes(image))

    def start_image(self, request: GenerationRequested) -> Image.Image:
        """A clip's starting image, RGB at the request's size: only the PNG at the request's own reference
        path in its person's folder (where the API writes it, checked), so no request can draw on
        another person's pictures; NotInStore or ValueError if it cannot be had."""
        own = self.store.uri(self.store.reference_path(request.user_id, request.request_id))
        if request.clip.start_image_uri != own:
            raise NotInStore(f"a starting image must be the request's own, {own}")
        data = self.store.read(own)
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            return ImageOps.fit(im.convert("RGB"), (request.width, request.height))

    def forget(self, user_id: str) -> None:
        """Delete a forgotten person's images, clips, results and starting images."""
        self.store.forget(user_id)

    def record(self, request: GenerationRequested, result: Result) -> Result:
        self.store.write(self.store.path(request.user_id, request.request_id, "json"), encode_event(result))
        return result


class Worker:
    def __init__(self, cfg: ServeConfig, generator: StyleGenerator, metrics: ServeMetrics | None = None):
        ensure_topics(cfg.bootstrap_servers)
        self.cfg = cfg
        self.generator = generator
        self.metrics = metrics or ServeMetrics()
        self.output = OutputStore(cfg.output_url)
        self.styles = StyleTable(cfg.bootstrap_servers)
        self.styles.catch_up()
        self._forget_erased()
        self._producer = clients.producer(cfg.bootstrap_servers)
        self._sent: list = []  # this batch's sends, each checked before the batch is committed
        self._requests = clients.consumer(cfg.bootstrap_servers, group_id=cfg.group_id)
        self._requests.subscribe([GENERATION_REQUESTS])
        self._probe = clients.QuietProbe(cfg.bootstrap_servers)  # a broker gone is reported, not waited out silently

    def close(self) -> None:
        for c in (self._requests, self.styles, self._producer):
            c.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, max_requests: int | None = None, idle_exit_s: float | None = None,
            on_result: Callable[[Result], None] | None = None, stop: threading.Event | None = None) -> int:
        """Serve until `max_requests` were handled, nothing arrived for `idle_exit_s` (forever if
        None) or `stop` is set (the batch in progress is answered and committed first).

        Requests are batched across users: up to `max_batch` requests, or what arrived within
        `max_wait_ms` of the first, then one diffusion call per group of compatible requests.
        """
        handled, idle_since = 0, time.monotonic()
        stop = stop or threading.Event()
        while (max_requests is None or handled < max_requests) and not stop.is_set():
            # A broker that goes away is waited for; what was handled but not committed comes again
            # and is answered from its stored result.
            limit = max_requests - handled if max_requests else self.cfg.max_batch
            n = clients.with_backoff(partial(self._serve_batch, limit, on_result), stop, retry_all=True,
                                     on_retry=self._retrying,
                                     until=idle_since + idle_exit_s if idle_exit_s is not None else None)
            if n is not None:  # got through (None: stopped, or idle past --idle-exit while failing)
                self.metrics.broker_failing.set(0)
            if n:
                handled += n
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                break
        return handled

    def _retrying(self, e: Exception, delay: float) -> None:
        """A broker error, to be retried: logged with its reason and counted on /metrics, never silent."""
        log.warning("%s; retrying in %.1f s", clients.describe(e), delay)
        self.metrics.broker_retries.labels(type(clients.cause(e)).__name__).inc()
        self.metrics.broker_failing.set(1)

    def _serve_batch(self, limit: int, on_result: Callable[[Result], None] | None) -> int:
        """Collect, answer and commit one batch of requests; how many there were."""
        records = self._collect(limit)
        if records:
            self.styles.catch_up()
        else:
            self.styles.poll()
        self._forget_erased()
        self.generator.loras.drop_versions(self.styles.withdrawn)
        if not records:
            self._probe.check()
            return 0
        self._probe.heard()
        for result in self.handle_batch(records):
            if on_result:
                on_result(result)
        self._update_queue_depth()
        sent, self._sent = self._sent, []
        clients.acknowledged(self._producer, sent)
        self._requests.commit()  # after the results are out: a crash or a failed send redelivers, never loses
        return len(records)

    def _forget_erased(self) -> None:
        """People who asked to be forgotten: their images, results and LoRA adapters deleted."""
        for user_id in sorted(self.styles.take_forgotten()):
            self.output.forget(user_id)
            self.generator.loras.forget(user_id)
            log.info("forgot a person: their images, results and LoRA adapter are deleted")

    def _collect(self, limit: int) -> list:
        limit = min(limit, self.cfg.max_batch)
        records = [r for rs in self._requests.poll(timeout_ms=clients.POLL_MS, max_records=limit).values()
                   for r in rs]
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while records and len(records) < limit and (left := deadline - time.monotonic()) > 0:
            more = self._requests.poll(timeout_ms=int(left * 1000) or 1, max_records=limit - len(records))
            records += [r for rs in more.values() for r in rs]
        return records

    def handle_batch(self, records: list) -> list[Result]:
        """Results for a batch of request records (invalid ones go to the dead-letter topic)."""
        # 1. Parse: an invalid request becomes a dead letter; a request twice in the batch counts once;
        #    a request of a person forgotten since is void (answering it would keep something of them)
        traces: dict[str, bytes] = {}
        requests = [r for r in self._parse(records, traces)
                    if not self.styles.forgotten_since(r.user_id, r.event_time)]
        # 2. Answer redeliveries from their stored results (no second image)
        results: dict[str, Result | None] = {r.request_id: self.output.existing_result(r) for r in requests}
        # 3. Resolve style and conditioning: a request that cannot be met fails now, the rest wait for
        #    their diffusion call, grouped by batch key
        jobs: dict[tuple, list[Job]] = {}
        for request in requests:
            if results[request.request_id] is None:
                results[request.request_id] = self._plan(request, jobs)
        # 4. One diffusion call per batch key and up to `max_batch` rows (a clip's frames are rows; previews,
        #    where asked for, published as they are made)
        for group in jobs.values():
            for call in packed(group, self.cfg.max_batch):
                for job, result in self._generate(call, traces):
                    results[job.request.request_id] = result
        # 5. Publish the results and record their metrics
        out = [r for r in results.values() if r is not None]
        self._publish(out, {r.request_id: r.event_time for r in requests}, traces)
        return out

    def _parse(self, records: list, traces: dict[str, bytes]) -> list[GenerationRequested]:
        """The valid requests, once each; `traces` gets each one's trace id header, if it has one."""
        requests: dict[str, GenerationRequested] = {}
        for record in records:
            try:
                request = parse_event(GENERATION_REQUESTS, record.value or b"")
            except InvalidEvent as e:
                dead = DeadLetter.of(record, "validate", str(e))
                topic, key, value = dead.message()
                self._sent.append(self._producer.send(topic, key=key, value=value))
                continue
            requests.setdefault(request.request_id, request)
            if trace := dict(record.headers or ()).get(clients.TRACE_HEADER):
                traces[request.request_id] = trace
        return list(requests.values())

    def _publish(self, results: list[Result], requested: dict[str, datetime], traces: dict[str, bytes]) -> None:
        now = datetime.now(UTC)
        for result in results:
            self._send_result(result, traces)
            self.metrics.results.labels("completed" if result.type == "generation_completed" else "failed").inc()
            self.metrics.latency.observe((now - requested[result.request_id]).total_seconds())

    def _send_result(self, event: Result | GenerationProgress, traces: dict[str, bytes]) -> None:
        """On generation-results, keyed by user, with the request's trace id header if it had one."""
        trace = traces.get(event.request_id)
        self._sent.append(self._producer.send(GENERATION_RESULTS, key=event.user_id.encode(),
                                              value=encode_event(event),
                                              headers=[(clients.TRACE_HEADER, trace)] if trace else None))

    def _plan(self, request: GenerationRequested, jobs: dict[tuple, list[Job]]) -> Result | None:
        """A failed result right away if the request cannot be met; else None, with it queued in `jobs`
        under its batch key."""
        style, missing = self._style_for(request)
        if missing:
            return self.output.record(request, _failed(request, f"user {request.user_id}: {missing}"))
        try:
            cond = self.generator.condition(request, style)
        except ValueError as e:
            return self.output.record(request, _failed(request, f"{type(e).__name__}: {e}"))
        if request.clip and request.clip.start_image_uri:
            try:
                cond = dataclasses.replace(cond, start=self.output.start_image(request))
            except (NotInStore, OSError, ValueError) as e:
                return self.output.record(request, _failed(request, f"the starting image cannot be read: {e}"))
        jobs.setdefault(batch_key(request), []).append(Job(request, style, cond))
        return None

    def _update_queue_depth(self) -> None:
        depth = 0
        for tp in self._requests.assignment():
            high = self._requests.highwater(tp)
            if high is not None:
                depth += max(0, high - self._requests.position(tp))
        self.metrics.queue_depth.set(depth)

    def _style_for(self, request: GenerationRequested) -> tuple[StyleVectorUpdated | None, str | None]:
        """(the style to use, None) or (None, why the request cannot be served). A pinned or minimum
        version not seen yet is waited for, at most `style_wait_ms`."""
        def acceptable(s: StyleVectorUpdated | None) -> bool:
            return s is not None and (request.min_style_version is None or s.version >= request.min_style_version)

        pinned = request.style_version
        if request.style_code is not None:  # a pin by code is a pin of the latest version with that code
            pinned = self.styles.version_with_code(request.user_id, request.style_code)
            if pinned is None:
                return None, (f"no style version with code {request.style_code} is kept (withdrawn, superseded "
                              "more than an hour ago, or never published)")

        if pinned is not None and self.styles.withdrawn(request.user_id, pinned):
            return None, (f"style version {pinned} counted photos the user has since withdrawn; "
                          "pin a later version or none")
        style = self.styles.get(request.user_id, pinned)
        latest = self.styles.get(request.user_id)
        if style is None and pinned is not None and latest and latest.version > pinned:
            # a user's versions arrive in order, so a newer one means this one was compacted away
            return None, (f"style version {pinned} was superseded by version {latest.version} and is "
                          "no longer kept (style-vectors keeps superseded versions at least an hour); pin a later "
                          "version or none")
        waits = pinned is not None or request.min_style_version is not None
        deadline = time.monotonic() + self.cfg.style_wait_ms / 1000
        while waits and not acceptable(style) and time.monotonic() < deadline:
            self.styles.poll(timeout_ms=100)
            style = self.styles.get(request.user_id, pinned)
        if acceptable(style):
            return style, None
        if pinned is not None:
            return None, f"style version {pinned} not known after {self.cfg.style_wait_ms} ms"
        if request.min_style_version is not None:
            have = f"version {style.version}" if style else "no style"
            return None, (f"has {have}, the request needs at least version {request.min_style_version} "
                          f"(waited {self.cfg.style_wait_ms} ms)")
        if request.allow_unpersonalized:
            return None, None
        return None, "no style vector yet (set allow_unpersonalized to generate without)"

    def _generate(self, group: list[Job], traces: dict[str, bytes]) -> list[tuple[Job, Result]]:
        """One diffusion call for the group; if it fails, each request alone, so one bad request
        (or one too large for memory) fails by itself while the rest complete."""
        requests = [job.request for job in group]

        previewing = True  # until a preview fails: previews are a nicety, the images are the work

        def preview(row: int, index: int, steps: int, image) -> None:
            nonlocal previewing
            if not previewing:
                return
            request = requests[row]
            try:
                progress = GenerationProgress(
                    event_id=f"progress-{request.request_id}-{index}", user_id=request.user_id,
                    event_time=datetime.now(UTC), request_id=request.request_id, partial_image_index=index,
                    step=steps, image_uri=self.output.save_preview(request, index, image))
                self._send_result(progress, traces)  # sent within linger_ms, not held for the batch
            except Exception:
                previewing = False
                log.exception("a preview failed; no more previews in this call")

        t0 = time.perf_counter()
        try:
            images = self.generator.generate_batch(requests, [job.cond for job in group], preview)
        except (ValueError, RuntimeError) as e:
            if len(group) == 1:
                log.exception("generation failed for %s", requests[0].request_id)
                return [(group[0], self.output.record(requests[0], _failed(requests[0], f"{type(e).__name__}: {e}")))]
            return [pair for job in group for pair in self._generate([job], traces)]
        seconds = time.perf_counter() - t0
        self.metrics.batch_size.observe(len(group))
        self.metrics.generate.observe(seconds)
        timings = {"generate": round(seconds * 1000, 1), "batch": len(group)}
        done = []
        for job, output in zip(group, images, strict=True):
            try:
                done.append((job, self.output.save(job.request, output, partial(_completed, job, timings))))
            except (av.FFmpegError, ValueError) as e:  # a clip that cannot be encoded fails by itself, answered
                failed = _failed(job.request, f"cannot encode the clip: {e}")
                done.append((job, self.output.record(job.request, failed)))
        return done


def packed(jobs: list[Job], max_rows: int) -> list[list[Job]]:
    """Jobs in calls of at most `max_rows` rows, in order (a clip larger than that alone in its call)."""
    calls: list[list[Job]] = []
    rows = max_rows
    for job in jobs:
        if rows + job.request.rows > max_rows:
            calls.append([])
            rows = 0
        calls[-1].append(job)
        rows += job.request.rows
    return calls


def _completed(job: Job, timings: dict[str, float], image_uri: str) -> GenerationCompleted:
    request, cond = job.request, job.cond
    return GenerationCompleted(
        event_id=f"done-{request.request_id}", user_id=request.user_id, event_time=datetime.now(UTC),
        request_id=request.request_id, image_uri=image_uri, style_version=job.style.version if job.style else None,
        style_code=job.style.style_code if job.style else None,
        facet=cond.facet, lora=cond.lora is not None, style_strength=cond.strength, seed=request.seed,
        frames=request.clip.frames if request.clip else None, timings_ms=timings)


def _failed(request: GenerationRequested, reason: str) -> GenerationFailed:
    return GenerationFailed(event_id=f"failed-{request.request_id}", user_id=request.user_id,
                            event_time=datetime.now(UTC), request_id=request.request_id, reason=reason)
