#!/usr/bin/env python
"""Serving throughput and latency, side by side on the same model in one run:

  (a) sequential    plain diffusers StableDiffusionPipeline, one request at a time, no personalization
  (b) batched_plain the same pipeline, BATCH prompts per call, no personalization
  (c) mixed_user    the worker's batch call: BATCH users per call, each with its own style embedding
                    and strength (IP-Adapter, per-sample)
  (d) mixed_lora    (c) plus each user's own LoRA file (rank --lora-rank), applied per sample as one
                    batched operation (models/low_rank.py)
  (e) mixed_hyper   (c) plus each user's hyper-LoRA adapter made from their style (a random hyper-LoRA
                    network, as serving runs a trained one)
  (a)-(e) are timed in turn, round after round (`--reps`), and each reports its fastest round.
  steady            the real worker (broker, style table, images written, results published) at a
                    steady arrival rate: latency p50/p95 from request to result

Random weights throughout (tiny config by default; `--config sd15` builds an SD-1.5-sized model,
meant for a GPU). Final line: one JSON object with device, batch, sequential_ips, batched_plain_ips,
mixed_user_ips, mixed_lora_ips, mixed_hyper_ips, ratio_mixed_vs_plain, ratio_mixed_vs_sequential,
lora_ratio and hyper_ratio (mixed_lora and mixed_hyper against batched_plain), lora_vs_mixed and
hyper_vs_mixed (against mixed_user: what the LoRA itself costs), latency_p50_s, latency_p95_s
(`--rate 0` skips the steady phase).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from stylestream.models.clip import embedding_dim, ensure_tiny_clip
from stylestream.models.hyper_lora import HYPER_LORA_FILE, HyperLora, target_layers
from stylestream.models.random_models import ensure_tiny_diffusion, random_lora
from stylestream.schemas.events import GenerationRequested, StyleVectorUpdated, encode_event, parse_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.generator import Conditioning, StyleGenerator
from stylestream.serving.worker import ServeConfig, Worker
from stylestream.streams import clients
from stylestream.streams.broker import add_broker_option, start_local_broker
from stylestream.streams.topics import GENERATION_REQUESTS, GENERATION_RESULTS, STYLE_VECTORS, ensure_topics
from stylestream.transforms.style import StyleStats
from stylestream.transforms.vectors import style_vector_event


def interleaved(calls: dict[str, Callable[[], object]], images: int, reps: int) -> dict[str, float]:
    """Images per second of each call: one warm-up each, then `reps` rounds that time every call once,
    in turn, so that the machine's drifting speed falls on all alike; the fastest round of each (other
    work on the machine only ever slows a round down, as timeit reasons)."""
    for fn in calls.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - t)
    return {name: images / min(s) for name, s in seconds.items()}


def random_styles(users: list[str], style_dim: int) -> dict[str, StyleVectorUpdated]:
    """A first style version per user, with a random embedding."""
    rng = np.random.default_rng(0)
    styles = {}
    for u in users:
        emb = rng.normal(size=style_dim - len(FEATURE_NAMES))
        stats = StyleStats.of(emb / np.linalg.norm(emb), np.full(len(FEATURE_NAMES), 0.3), 1.0)
        styles[u] = style_vector_event(u, 1, stats, [], [], None, datetime.now(UTC))
    return styles


def steady_latency(gen: StyleGenerator, styles: dict[str, StyleVectorUpdated], rate: float, duration: float,
                   size: int, steps: int, batch: int, work: Path, engine: str) -> dict:
    broker = start_local_broker(engine)
    users = sorted(styles)
    try:
        bs = broker.bootstrap_servers
        ensure_topics(bs)
        producer = clients.producer(bs, linger_ms=0)
        for u, style in styles.items():
            producer.send(STYLE_VECTORS, key=u.encode(), value=encode_event(style))
        producer.flush()
        n = int(rate * duration)
        with Worker(ServeConfig(bs, str(work / "images"), max_batch=batch, max_wait_ms=int(1000 / rate)), gen) as w:
            sent = {}

            def produce():
                start = time.monotonic()
                for i in range(n):
                    time.sleep(max(0.0, start + i / rate - time.monotonic()))
                    r = GenerationRequested(event_id=f"s{i}", user_id=users[i % len(users)],
                                            event_time=datetime.now(UTC), request_id=f"s{i}", prompt=f"card {i}",
                                            seed=i, num_inference_steps=steps, width=size, height=size)
                    sent[r.request_id] = time.monotonic()
                    producer.send(GENERATION_REQUESTS, key=r.user_id.encode(), value=encode_event(r))
                    producer.flush()
            t = threading.Thread(target=produce)
            t.start()
            done = {}
            w.run(max_requests=n, idle_exit_s=60,
                  on_result=lambda r: done.setdefault(r.request_id, time.monotonic()))
            t.join()
        results = [parse_event(GENERATION_RESULTS, m.value) for m in clients.read_all(bs, GENERATION_RESULTS)]
        lat = sorted(done[r] - sent[r] for r in done if r in sent)
        return {"requests": n, "completed": sum(r.type == "generation_completed" for r in results),
                "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
                "latency_p95_s": round(float(np.percentile(lat, 95)), 3)}
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_broker_option(ap)
    ap.add_argument("--config", default="tiny", help="configs/diffusion/<config>.json: tiny or sd15")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=None, help="image side (default: 64 tiny, 512 sd15)")
    ap.add_argument("--reps", type=int, default=5, help="rounds, each timing every variant once in turn")
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s in the steady phase (0: no steady phase)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--lora-rank", type=int, default=8)
    a = ap.parse_args()
    size = a.size or (512 if a.config == "sd15" else 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    clip = ensure_tiny_clip(work / "models")
    style_dim = embedding_dim(clip) + len(FEATURE_NAMES)
    spec = ensure_tiny_diffusion(work / "models", style_dim, a.config)
    users = [f"user{i}" for i in range(a.batch)]
    unet = UNet2DConditionModel.from_pretrained(spec.model_dir, subfolder="unet")
    (work / "loras").mkdir()
    for i, u in enumerate(users):
        save_file(random_lora(unet, a.lora_rank, seed=i), str(work / "loras" / f"{u}.safetensors"))
    del unet

    dtype = torch.float16 if device == "cuda" else torch.float32
    plain = StableDiffusionPipeline.from_pretrained(spec.model_dir, dtype=dtype, safety_checker=None,
                                                    requires_safety_checker=False).to(device)
    plain.set_progress_bar_config(disable=True)
    prompts = [f"a birthday card, style {i}" for i in range(a.batch)]

    def call_plain(ps):
        return plain(prompt=ps, num_inference_steps=a.steps, guidance_scale=0.0, width=size, height=size,
                     generator=[torch.Generator("cpu").manual_seed(i) for i in range(len(ps))], output_type="pil")
    gen = StyleGenerator(spec, clip, device, lora_dir=work / "loras", max_loras=a.batch)
    rng = np.random.default_rng(1)
    reqs = [GenerationRequested(event_id=f"b{i}", user_id=u, event_time=datetime.now(UTC), request_id=f"b{i}",
                                prompt=p, seed=i, num_inference_steps=a.steps, width=size, height=size)
            for i, (u, p) in enumerate(zip(users, prompts, strict=True))]
    conds = [Conditioning(rng.normal(size=style_dim).astype(np.float32), float(rng.uniform(0.3, 1.0)), None)
             for _ in reqs]
    lora_conds = [Conditioning(c.embedding, c.strength, None, gen.loras.of_user(r.user_id))
                  for c, r in zip(conds, reqs, strict=True)]
    hyper = HyperLora(style_dim, target_layers(gen.pipe.unet))
    torch.nn.init.normal_(hyper.head.weight, std=0.02)  # random deltas, as a trained net's are not zero
    hyper.save(work / HYPER_LORA_FILE)
    gen_hyper = StyleGenerator(dataclasses.replace(spec, hyper_lora=str(work / HYPER_LORA_FILE)), clip, device,
                               max_loras=a.batch)
    styles = random_styles(users, style_dim)
    hyper_conds = [gen_hyper.condition(r, styles[r.user_id]) for r in reqs]
    assert all(c.lora is not None for c in hyper_conds)
    ips = interleaved({"sequential": lambda: [call_plain([p]) for p in prompts],
                       "batched_plain": lambda: call_plain(prompts),
                       "mixed_user": lambda: gen.generate_batch(reqs, conds),
                       "mixed_lora": lambda: gen.generate_batch(reqs, lora_conds),
                       "mixed_hyper": lambda: gen_hyper.generate_batch(reqs, hyper_conds)}, a.batch, a.reps)
    sequential, batched_plain, mixed, mixed_lora, mixed_hyper = ips.values()
    for name, per_s in ips.items():
        print(json.dumps({"bench": name, "images_per_s": round(per_s, 2)}), flush=True)
    steady = {"latency_p50_s": None, "latency_p95_s": None}
    if a.rate > 0:
        steady = steady_latency(gen, styles, a.rate, a.duration, size, a.steps, a.batch, work, a.broker)
        print(json.dumps({"bench": "steady", **steady}), flush=True)
    print(json.dumps({
        "bench": "serve", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": a.config,
        "batch": a.batch, "steps": a.steps, "size": size, "sequential_ips": round(sequential, 2),
        "batched_plain_ips": round(batched_plain, 2), "mixed_user_ips": round(mixed, 2),
        "mixed_lora_ips": round(mixed_lora, 2), "mixed_hyper_ips": round(mixed_hyper, 2),
        "ratio_mixed_vs_plain": round(mixed / batched_plain, 3),
        "ratio_mixed_vs_sequential": round(mixed / sequential, 3),
        "lora_ratio": round(mixed_lora / batched_plain, 3), "hyper_ratio": round(mixed_hyper / batched_plain, 3),
        "lora_vs_mixed": round(mixed_lora / mixed, 3), "hyper_vs_mixed": round(mixed_hyper / mixed, 3),
        "lora_rank": a.lora_rank, "steady_rate": a.rate,
        "latency_p50_s": steady["latency_p50_s"], "latency_p95_s": steady["latency_p95_s"]}))


if __name__ == "__main__":
    main()
