#!/usr/bin/env python
"""Ingestion throughput and latency, with the transforms alone as the baseline in the same run.

  full path        USERS x PHOTOS uploads on a local broker -> ingestion cycles (Kafka read, decode,
                   features, embedding, per-user update, DuckDB commit, Parquet, style-vectors)
  transforms only  the same Beam transforms (parse, decode, features, embed, group by user) over the
                   same messages held in memory: no Kafka, no DuckDB
  contributions    the same USERS x PHOTOS as photo_embedded events (what a device sends: computed once
                   per file here) on a second broker into a fresh state: the state's own cost, with no
                   decoding or embedding on the server
  steady           RATE events/s for DURATION s into a following ingestion (each event a new user),
                   timing each event from produce to its user's vector on the style-vectors topic,
                   and the process's resident memory from the end of warm-up to the end

Photos are 320x240 JPEGs (64 distinct files shared by all photo ids). The transforms alone run before
and after the full path; the ratio is against the mean of the two. Final line: one JSON object
with events_per_s, photos_per_s, contribution_events_per_s (and its ratio to events_per_s),
overhead_ratio (full path time / transforms-only time), latency_p50_s, latency_p99_s and rss_growth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import apache_beam as beam
import numpy as np
import psutil
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from stylestream.demo.synthetic import LOOKS, SyntheticPhoto, render
from stylestream.models.clip import ensure_tiny_clip
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.schemas.events import DeviceContribution, encode_event, parse_event
from stylestream.streams import clients
from stylestream.streams.broker import add_broker_option, start_local_broker
from stylestream.streams.topics import PHOTO_EVENTS, STYLE_VECTORS, ensure_topics
from stylestream.transforms.device import DevicePhoto, contributions
from stylestream.transforms.embed import EmbedPhotos, OpenClipImageHandler
from stylestream.transforms.grouping import GroupByUser
from stylestream.transforms.images import PreparePhotos
from stylestream.transforms.parse import ParseEvents
from stylestream.transforms.pixels import DecodeLimits
from stylestream.transforms.records import capture_day


def photo_files(root: Path) -> list[Path]:
    files = []
    for i in range(64):
        path = root / f"img{i}.jpg"
        render(LOOKS[sorted(LOOKS)[i % len(LOOKS)]], i, (320, 240)).save(path, "JPEG", quality=88)
        files.append(path)
    return files


def upload(files: list[Path], user: str, n: int, when: datetime) -> bytes:
    p = SyntheticPhoto(user, f"{user}-p{n}", f"{user}-a{n % 3}", "", files[(hash(user) + n) % len(files)], when)
    return encode_event(p.upload_event(when))


def device_contributions(files: list[Path], clip) -> list[DeviceContribution]:
    """Each file's contribution as a device computes it (`stylestream device sync`'s code)."""
    handler = OpenClipImageHandler(clip, device="cpu")
    photos = [DevicePhoto(f"f{i}", None, path.read_bytes(), datetime(2025, 1, 1, tzinfo=UTC))
              for i, path in enumerate(files)]
    return contributions(photos, clip, DecodeLimits(), handler, handler.load_model())


def contribution(made: list[DeviceContribution], user: str, n: int, when: datetime) -> bytes:
    c = made[(hash(user) + n) % len(made)].model_copy(update={
        "photo_id": f"{user}-p{n}", "album_id": f"{user}-a{n % 3}", "taken_at": capture_day(when)})
    return encode_event(c.as_event(user, when))


def contributions_path(broker_engine: str, work: Path, clip, made: list[DeviceContribution], users: int,
                       photos: int) -> float:
    """Seconds for ingestion to count USERS x PHOTOS device contributions, on a broker of their own."""
    broker = start_local_broker(broker_engine)
    try:
        bs = broker.bootstrap_servers
        ensure_topics(bs)
        produce(bs, lambda user, n, when: contribution(made, user, n, when), users, photos)
        with Ingestor(IngestConfig(bs, work / "state-contributions", clip)) as ingestor:
            t = time.perf_counter()
            cycles = ingestor.run_until_caught_up()
            seconds = time.perf_counter() - t
        if sum(c.photos for c in cycles) != users * photos or any(c.dead_letters for c in cycles):
            raise SystemExit(f"the contributions were not all counted: {cycles}")
        return seconds
    finally:
        broker.stop()


def produce(bs: str, event: Callable[[str, int, datetime], bytes], users: int, photos: int) -> None:
    producer = clients.producer(bs, linger_ms=20, batch_size=512 * 1024)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for n in range(photos):
        for u in range(users):
            user = f"user-{u:05d}"
            producer.send(PHOTO_EVENTS, key=user.encode(), value=event(user, n, t0 + timedelta(hours=n)))
    producer.flush()
    producer.close()


def transforms_only(messages: list[clients.Message], cfg: IngestConfig) -> float:
    t = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        events = p | "Messages" >> beam.Create(messages, reshuffle=False) | "DecodeValidate" >> ParseEvents()
        photos = events.uploads | "FetchDecodeStripPII" >> PreparePhotos(cfg.limits)
        contributions = photos.ok | "Embed" >> EmbedPhotos(cfg.clip)
        _ = (contributions, events.deletes, events.toggles) | "GroupByUser" >> GroupByUser()
    return time.perf_counter() - t


def steady(cfg: IngestConfig, files: list[Path], rate: float, duration: float, warmup: float,
           profile: Path | None = None) -> dict:
    """`stylestream ingest --follow` in its own process, as deployed; this process produces and watches.
    With `profile`, the follower runs under cProfile and writes its statistics there when stopped."""
    bs = cfg.bootstrap_servers
    log = cfg.state_dir.parent / "follower.log"
    profiling = ["-m", "cProfile", "-o", str(profile)] if profile else []
    follower = subprocess.Popen([sys.executable, *profiling, "-m", "stylestream.cli.main", "ingest", "--follow",
                                 "-b", bs, "--data-dir", str(cfg.state_dir.parent)],
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
    consumer = clients.consumer(bs)
    tps = clients.partitions_of(consumer, STYLE_VECTORS)
    ends = clients.true_end_offsets(consumer, tps)
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, ends[tp])
    producer = clients.producer(bs, linger_ms=0)

    def wait_for(users: set[str], seen: dict[str, float], until: float) -> bool:
        while not users <= set(seen) and time.monotonic() < until:
            for records in consumer.poll(timeout_ms=50).values():
                now = time.monotonic()
                for r in records:
                    seen.setdefault(parse_event(STYLE_VECTORS, r.value).user_id, now)
        return users <= set(seen)

    # Ready once a probe upload comes back as a vector: start-up is not part of the latency.
    producer.send(PHOTO_EVENTS, key=b"probe", value=upload(files, "probe", 0, datetime.now(UTC)))
    producer.flush()
    if not wait_for({"probe"}, {}, time.monotonic() + 120):
        follower.kill()
        raise SystemExit(f"the following ingestion never published the probe's vector; its output:\n{log.read_text()}")
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    rss: dict[str, int] = {}
    proc = psutil.Process(follower.pid)

    def produce() -> None:
        start = time.monotonic()
        for i in range(int(rate * duration)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            user = f"steady-{i:06d}"
            sent[user] = time.monotonic()
            producer.send(PHOTO_EVENTS, key=user.encode(), value=upload(files, user, 0, datetime.now(UTC)))
            if "start" not in rss and time.monotonic() - start >= warmup:
                rss["start"] = proc.memory_info().rss
        producer.flush()

    producer_thread = threading.Thread(target=produce)
    producer_thread.start()
    expected = {f"steady-{i:06d}" for i in range(int(rate * duration))}
    wait_for(expected, seen, time.monotonic() + duration + 60)
    rss["end"] = proc.memory_info().rss
    producer_thread.join()
    follower.send_signal(signal.SIGTERM)
    follower.wait(timeout=120)
    producer.close()
    consumer.close()
    latencies = sorted(seen[u] - sent[u] for u in seen if u in sent)
    return {"events": len(expected), "seen": len(latencies),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
            "latency_p99_s": round(float(np.percentile(latencies, 99)), 3),
            "rss_start_mb": round(rss.get("start", rss["end"]) / 2**20, 1), "rss_end_mb": round(rss["end"] / 2**20, 1),
            "rss_growth": round(rss["end"] / rss.get("start", rss["end"]) - 1, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_broker_option(ap)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--photos", type=int, default=50, help="photos per user")
    ap.add_argument("--rate", type=float, default=50.0, help="events/s in the steady phase")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the steady phase")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the steady RSS baseline")
    ap.add_argument("--profile", type=Path, help="write the steady follower's cProfile statistics here "
                    "(read them with `python -m pstats`); its latencies then include the profiler's cost")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    files = photo_files(work)
    clip = ensure_tiny_clip(work / "models")
    broker = start_local_broker(a.broker)
    try:
        bs = broker.bootstrap_servers
        ensure_topics(bs)
        produce(bs, lambda user, n, when: upload(files, user, n, when), a.users, a.photos)
        events = a.users * a.photos
        cfg = IngestConfig(bs, work / "state", clip)
        messages = clients.read_all(bs, PHOTO_EVENTS)

        # The baseline before and after the full path, against the mean of the two: the machine's
        # speed drifts over the minutes the three take (one baseline gave ratios from 0.95 to 1.17).
        only_s = []

        def baseline() -> None:
            only_s.append(transforms_only(messages, cfg))
            print(json.dumps({"bench": "transforms_only", "events": len(messages), "seconds": round(only_s[-1], 1),
                              "events_per_s": round(len(messages) / only_s[-1], 1)}), flush=True)

        baseline()
        with Ingestor(cfg) as ingestor:
            t = time.perf_counter()
            cycles = ingestor.run_until_caught_up()
            full_s = time.perf_counter() - t
        print(json.dumps({"bench": "full_path", "events": events, "cycles": len(cycles), "seconds": round(full_s, 1),
                          "events_per_s": round(events / full_s, 1)}), flush=True)
        baseline()
        baseline_s = float(np.mean(only_s))
        device_s = contributions_path(a.broker, work, clip, device_contributions(files, clip), a.users, a.photos)
        print(json.dumps({"bench": "contributions", "events": events, "seconds": round(device_s, 1),
                          "events_per_s": round(events / device_s, 1)}), flush=True)
        s = steady(cfg, files, a.rate, a.duration, a.warmup, a.profile)
        print(json.dumps({"bench": "steady", **s}), flush=True)
    finally:
        broker.stop()
    print(json.dumps({"bench": "ingest", "users": a.users, "photos_per_user": a.photos,
                      "events_per_s": round(events / full_s, 1), "photos_per_s": round(events / full_s, 1),
                      "contribution_events_per_s": round(events / device_s, 1),
                      "contribution_speedup": round(full_s / device_s, 2),
                      "transforms_only_per_s": round(len(messages) / baseline_s, 1),
                      "overhead_ratio": round(full_s / baseline_s, 3), "latency_p50_s": s["latency_p50_s"],
                      "latency_p99_s": s["latency_p99_s"], "rss_growth": s["rss_growth"],
                      "steady_rate": a.rate, "steady_s": a.duration, "cpus": os.cpu_count()}))



if __name__ == "__main__":
    main()
