#!/usr/bin/env python
"""What the HTTP API adds: one image request answered through `POST /v1/images/generations` (the
official OpenAI client, waiting for the image) against the same request produced straight to
generation-requests and its result read from generation-results, side by side in one run.

One local broker, one serving worker (the tiny diffusion model, --steps steps, 64x64) and the API
in this process; one person with an ingested style. The two paths alternate, one request at a time,
so both see the same machine. Final line: one JSON object (medians and p90 in ms, and the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import openai

from stylestream.api.config import ApiConfig
from stylestream.api.system import DemoIssuer, running_services
from stylestream.demo.synthetic import make_library
from stylestream.models.clip import clip_spec
from stylestream.models.diffusion import diffusion_spec
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.pipelines.layout import DataLayout
from stylestream.schemas.events import GenerationRequested, encode_event, parse_event
from stylestream.serving.generator import StyleGenerator
from stylestream.serving.worker import ServeConfig
from stylestream.streams import clients
from stylestream.streams.broker import choose_engine, start_local_broker
from stylestream.streams.topics import GENERATION_REQUESTS, GENERATION_RESULTS, PHOTO_EVENTS, ensure_topics


def direct(bs: str, producer, results, user: str, steps: int) -> float:
    """Produce one request and read generation-results until its result arrives; seconds."""
    request_id = f"direct-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    r = GenerationRequested(event_id=request_id, user_id=user, event_time=datetime.now(UTC), request_id=request_id,
                            prompt="a lighthouse", num_inference_steps=steps)
    producer.send(GENERATION_REQUESTS, key=user.encode(), value=encode_event(r))
    producer.flush()
    while True:
        for records in results.poll(timeout_ms=50).values():
            if any(parse_event(GENERATION_RESULTS, m.value).request_id == request_id for m in records):
                return time.perf_counter() - t0


def through_api(client: openai.OpenAI) -> float:
    t0 = time.perf_counter()
    client.images.generate(prompt="a lighthouse", size="64x64", response_format="url")
    return time.perf_counter() - t0


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30, help="requests per path")
    ap.add_argument("--steps", type=int, default=4, help="diffusion steps per image (the API's default is 4)")
    ap.add_argument("--broker", default="auto", help="kafka, tansu or auto")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = DataLayout(Path(tmp))
        clip = clip_spec(root.models)
        diffusion = diffusion_spec(clip.pretrained)
        engine, _ = choose_engine(a.broker)
        with start_local_broker(engine, root.kafka) as broker:
            bs = broker.bootstrap_servers
            ensure_topics(bs)
            photos = make_library(root.root / "library", {"ana": [("beach", "warm", 6)]})
            clients.send_all(bs, [(PHOTO_EVENTS, p.user_id.encode(), encode_event(p.upload_event())) for p in photos])
            with Ingestor(IngestConfig(bs, root.state.root, clip)) as ingestor:
                ingestor.run_until_caught_up()
            issuer = DemoIssuer(root.root / "issuer")
            api = ApiConfig(bs, root.root, issuer.verifier(), steps=a.steps, person_rate="100000/minute",
                            person_images_rate="100000/minute")  # the bench measures latency, not limits
            with running_services(api, None, ServeConfig(bs, str(root.images)), StyleGenerator(diffusion, clip)) as srv:
                client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=issuer.token("ana"), max_retries=0)
                producer = clients.producer(bs)
                results = clients.consumer(bs)
                results.assign(clients.partitions_of(results, GENERATION_RESULTS))
                results.seek_to_end()
                through_api(client), direct(bs, producer, results, "ana", a.steps)  # warm both paths
                timings: dict[str, list[float]] = {"direct": [], "api": []}
                for _ in range(a.requests):
                    timings["direct"].append(direct(bs, producer, results, "ana", a.steps))
                    timings["api"].append(through_api(client))
                producer.close()
                results.close()
    d, h = summary(timings["direct"]), summary(timings["api"])
    print(f"{a.requests} requests per path, one at a time, {engine} broker, tiny model, {a.steps} steps, 64x64")
    print(f"{'path':>8} {'median ms':>10} {'p90 ms':>8}")
    for name, s in (("direct", d), ("api", h)):
        print(f"{name:>8} {s['median_ms']:>10} {s['p90_ms']:>8}")
    added = round(h["median_ms"] - d["median_ms"], 1)
    print(f"the API adds {added} ms at the median ({h['median_ms'] / d['median_ms']:.2f}x the direct path)")
    print(json.dumps({"requests": a.requests, "broker": engine.value, "direct": d, "api": h, "added_median_ms": added,
                      "ratio_median": round(h["median_ms"] / d["median_ms"], 3)}))


if __name__ == "__main__":
    main()
