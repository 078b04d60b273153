"""Serving end to end: requests joined with published style vectors, a real diffusers pipeline."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from helpers import produce, read_topic
from PIL import Image

from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.schemas.events import GenerationRequested, parse_event
from stylestream.serving.generator import StyleGenerator, preview_steps
from stylestream.serving.worker import ServeConfig, Worker
from stylestream.streams.topics import (
    CONSENT_EVENTS,
    GENERATION_REQUESTS,
    GENERATION_RESULTS,
    PHOTO_EVENTS,
    STYLE_VECTORS,
    dlq,
)


def request(user: str, rid: str, **kw) -> GenerationRequested:
    kw = {"prompt": "a birthday card", "seed": 3, **kw}
    return GenerationRequested(event_id=f"e-{rid}", user_id=user, event_time=datetime.now(UTC), request_id=rid, **kw)


@pytest.fixture(scope="module")
def generator(diffusion, clip):
    return StyleGenerator(diffusion, clip, device="cpu")


@pytest.mark.smoke
def test_personalized_image_names_its_style_version(broker, make_ingestor, generator, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 3)], "ben": [("b", "mono", 3)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    make_ingestor().run_until_caught_up()
    reqs = [request("ana", "r1"), request("ben", "r2"), request("nobody", "r3"),
            request("nobody", "r4", allow_unpersonalized=True), request("ana", "r5", style_version=9)]
    produce(bs, GENERATION_REQUESTS, [*reqs, (b"ana", b"not a request")])

    out = tmp_path / "images"
    with Worker(ServeConfig(bs, str(out), style_wait_ms=300), generator) as worker:
        assert worker.run(max_requests=len(reqs) + 1, idle_exit_s=20) == len(reqs) + 1
    results = {r.request_id: r for r in (parse_event(GENERATION_RESULTS, m.value)
                                         for m in read_topic(bs, GENERATION_RESULTS))}
    assert results["r1"].type == results["r2"].type == "generation_completed"
    assert results["r1"].style_version == results["r2"].style_version == 1
    assert results["r3"].type == "generation_failed" and "no style vector" in results["r3"].reason
    assert results["r4"].type == "generation_completed" and results["r4"].style_version is None
    assert results["r5"].type == "generation_failed"
    assert "style version 9 not known after 300 ms" in results["r5"].reason
    assert len(read_topic(bs, dlq(GENERATION_REQUESTS))) == 1

    ana = np.asarray(Image.open(out / "ana" / "r1.png"))
    ben = np.asarray(Image.open(out / "ben" / "r2.png"))
    plain = np.asarray(Image.open(out / "nobody" / "r4.png"))
    assert ana.shape == (64, 64, 3)
    assert np.abs(ana.astype(int) - ben).max() > 0, "different styles, same seed: images must differ"
    assert np.abs(ana.astype(int) - plain).max() > 0


def test_a_version_that_counted_withdrawn_photos_is_never_served(broker, make_ingestor, generator, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("home", "warm", 2), ("trip", "cool", 2)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[:2]])
    ing = make_ingestor()
    ing.run_until_caught_up()  # version 1: home only
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[2:]])
    ing.run_until_caught_up()  # version 2: home and trip
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "trip", False, datetime(2026, 3, 1, tzinfo=UTC))])
    ing.run_until_caught_up()  # version 3: home only again; version 2 counted the trip
    vectors = [parse_event(STYLE_VECTORS, m.value) for m in read_topic(bs, STYLE_VECTORS)]
    assert [(v.version, v.withdrawn_versions) for v in vectors] == [(1, []), (2, []), (3, [2])]

    reqs = [request("ana", "pinned-1", style_version=1), request("ana", "pinned-2", style_version=2),
            request("ana", "latest")]
    produce(bs, GENERATION_REQUESTS, reqs)
    with Worker(ServeConfig(bs, str(tmp_path / "images"), style_wait_ms=300), generator) as worker:
        assert worker.styles.get("ana", 2) is None
        worker.run(max_requests=len(reqs), idle_exit_s=20)
    results = {r.request_id: r for r in (parse_event(GENERATION_RESULTS, m.value)
                                         for m in read_topic(bs, GENERATION_RESULTS))}
    assert results["pinned-1"].style_version == 1 and results["latest"].style_version == 3
    assert results["pinned-2"].type == "generation_failed" and "withdrawn" in results["pinned-2"].reason


@pytest.mark.smoke
def test_redelivered_request_makes_no_second_image(broker, make_ingestor, generator, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 2)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    make_ingestor().run_until_caught_up()
    out = tmp_path / "images"
    produce(bs, GENERATION_REQUESTS, [request("ana", "same")])
    with Worker(ServeConfig(bs, str(out)), generator) as worker:
        assert worker.run(max_requests=1, idle_exit_s=60) == 1
    [result] = [parse_event(GENERATION_RESULTS, m.value) for m in read_topic(bs, GENERATION_RESULTS)]
    assert result.type == "generation_completed", result
    first = (out / "ana" / "same.png").stat().st_mtime_ns
    produce(bs, GENERATION_REQUESTS, [request("ana", "same")])  # redelivery
    with Worker(ServeConfig(bs, str(out)), generator) as worker:
        assert worker.run(max_requests=1, idle_exit_s=60) == 1
    assert (out / "ana" / "same.png").stat().st_mtime_ns == first
    results = [parse_event(GENERATION_RESULTS, m.value) for m in read_topic(bs, GENERATION_RESULTS)]
    assert [r.request_id for r in results] == ["same", "same"]
    assert results[0] == results[1]


def test_strength_zero_is_exactly_the_unpersonalized_image(broker, make_ingestor, generator, tmp_path):
    from stylestream.schemas.events import StyleVectorUpdated
    from stylestream.schemas.tables import FEATURE_NAMES

    rng = np.random.default_rng(0)
    style = StyleVectorUpdated(event_id="v", user_id="ana", event_time=datetime.now(UTC), version=1, photo_count=1,
                               embedding=rng.normal(size=64).tolist(), features=dict.fromkeys(FEATURE_NAMES, 0.5))
    none = np.asarray(generator.generate(request("ana", "x"), None)[0])
    zero = np.asarray(generator.generate(request("ana", "x", style_strength=0.0), style)[0])
    full = np.asarray(generator.generate(request("ana", "x", style_strength=1.0), style)[0])
    np.testing.assert_array_equal(none, zero)
    assert np.abs(full.astype(int) - none).max() > 0


def test_facet_is_chosen_by_the_prompt_in_clip_space(generator):
    from stylestream.schemas.events import StyleFacet, StyleVectorUpdated
    from stylestream.schemas.tables import FEATURE_NAMES

    rng = np.random.default_rng(1)
    text = generator.embed_prompt("a plate of pasta")
    other = rng.normal(size=text.shape)

    def facet(e, v):
        return StyleFacet(photo_count=3, weight_share=0.5, embedding=list(map(float, e)),
                          features=dict.fromkeys(FEATURE_NAMES, v))

    style = StyleVectorUpdated(event_id="v", user_id="ana", event_time=datetime.now(UTC), version=4, photo_count=6,
                               embedding=rng.normal(size=text.shape).tolist(),
                               features=dict.fromkeys(FEATURE_NAMES, 0.0), facets=[facet(other, 0.9), facet(text, 0.1)])
    _, chosen = generator.generate(request("ana", "f", prompt="a plate of pasta"), style)
    assert chosen == 1
    pinned, idx = generator.generate(request("ana", "f", facet=0), style)
    overall, none = generator.generate(request("ana", "f", facet="overall"), style)
    assert idx == 0 and none is None
    assert np.abs(np.asarray(pinned, int) - np.asarray(overall)).max() > 0
    with pytest.raises(ValueError, match="facet 5 asked for"):
        generator.generate(request("ana", "f", facet=5), style)


def test_mixed_user_batch_gives_each_user_their_own_image(broker, make_ingestor, generator, tmp_path):
    """Requests of several users share one diffusion call; each image equals that user's image made
    alone (diffusers would otherwise mix every user's style into every sample), and a request that
    cannot be met fails alone."""
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {u: [("a", look, 3)] for u, look in
                                             [("ana", "warm"), ("ben", "mono"), ("cleo", "cool")]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    make_ingestor().run_until_caught_up()
    reqs = [request("ana", "m1", style_strength=1.0), request("ben", "m2", style_strength=0.5, seed=9),
            request("cleo", "m3", guidance_scale=0.0, style_strength=0.0), request("ana", "bad", facet=7)]
    produce(bs, GENERATION_REQUESTS, reqs)
    out = tmp_path / "batched"
    with Worker(ServeConfig(bs, str(out), max_batch=8, max_wait_ms=2000), generator) as worker:
        worker.run(max_requests=len(reqs), idle_exit_s=20)
        styles = {u: worker.styles.get(u) for u in ("ana", "ben", "cleo")}
    results = {r.request_id: r for r in (parse_event(GENERATION_RESULTS, m.value)
                                         for m in read_topic(bs, GENERATION_RESULTS))}
    assert results["bad"].type == "generation_failed" and "facet 7" in results["bad"].reason
    assert {results[r].timings_ms["batch"] for r in ("m1", "m2", "m3")} == {3.0}
    for r in reqs[:3]:
        alone, _ = generator.generate(r, styles[r.user_id])
        batched = np.asarray(Image.open(out / r.user_id / f"{r.request_id}.png"), int)
        assert np.abs(batched - np.asarray(alone)).max() <= 2, r.request_id
    # Strength 0: exactly the unpersonalized image, run for run (alone, with and without her style); in
    # a batch, within a level of it (a batch's float sums may round one pixel the other way: seen on
    # these CPUs with or without styles in the batch).
    plain, _ = generator.generate(reqs[2], None)
    np.testing.assert_array_equal(np.asarray(generator.generate(reqs[2], styles["cleo"])[0]), np.asarray(plain))
    assert np.abs(np.asarray(Image.open(out / "cleo" / "m3.png"), int) - np.asarray(plain, int)).max() <= 1


def test_read_your_writes_waits_for_the_version_the_app_knows_of(broker, make_ingestor, generator, tmp_path):
    import threading

    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 3)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[:2]])
    ingestor = make_ingestor()
    ingestor.run_until_caught_up()  # version 1
    produce(bs, GENERATION_REQUESTS, [request("ana", "ryw", min_style_version=2)])
    with Worker(ServeConfig(bs, str(tmp_path / "out"), style_wait_ms=60_000), generator) as worker:
        serving = threading.Thread(target=worker.run, kwargs={"max_requests": 1, "idle_exit_s": 60})
        serving.start()
        time.sleep(1.0)  # the worker is now waiting for version 2
        produce(bs, PHOTO_EVENTS, [photos[2].upload_event()])
        ingestor.run_until_caught_up()  # version 2
        serving.join(timeout=90)
    [result] = [parse_event(GENERATION_RESULTS, m.value) for m in read_topic(bs, GENERATION_RESULTS)]
    assert result.type == "generation_completed" and result.style_version == 2

    produce(bs, GENERATION_REQUESTS, [request("ana", "too-new", min_style_version=5)])
    with Worker(ServeConfig(bs, str(tmp_path / "out"), style_wait_ms=200), generator) as worker:
        worker.run(max_requests=1, idle_exit_s=20)
    failed = parse_event(GENERATION_RESULTS, read_topic(bs, GENERATION_RESULTS)[-1].value)
    assert failed.type == "generation_failed" and "needs at least version 5" in failed.reason


def test_worker_exports_prometheus_metrics(broker, make_ingestor, generator, tmp_path):
    from prometheus_client import generate_latest

    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 2)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    make_ingestor().run_until_caught_up()
    produce(bs, GENERATION_REQUESTS, [request("ana", "p1"), request("ana", "p2"), request("nobody", "p3")])
    with Worker(ServeConfig(bs, str(tmp_path / "out"), max_wait_ms=2000), generator) as worker:
        worker.run(max_requests=3, idle_exit_s=20)
        text = generate_latest(worker.metrics.registry).decode()
    assert 'stylestream_serve_results_total{outcome="completed"} 2.0' in text
    assert 'stylestream_serve_results_total{outcome="failed"} 1.0' in text
    assert "stylestream_serve_batch_size_count 1.0" in text and "stylestream_serve_batch_size_sum 2.0" in text
    assert "stylestream_serve_latency_seconds_count 3.0" in text
    assert "stylestream_serve_queue_depth 0.0" in text


def test_per_user_lora_in_a_mixed_batch(diffusion, clip, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from stylestream.models.random_models import random_lora
    from stylestream.serving.generator import Conditioning

    unet = UNet2DConditionModel.from_pretrained(diffusion.model_dir, subfolder="unet")
    loras = tmp_path / "loras"
    loras.mkdir()
    for seed, user in enumerate(["ana", "ben"]):
        save_file(random_lora(unet, rank=4, seed=seed, scale=0.5), str(loras / f"{user}.safetensors"))
    gen = StyleGenerator(diffusion, clip, device="cpu", lora_dir=loras, max_loras=2)
    rng = np.random.default_rng(0)
    reqs = [request(u, f"l{i}", seed=i, guidance_scale=3.0) for i, u in enumerate(["ana", "ben", "cleo"])]
    conds = [Conditioning(rng.normal(size=gen.style_dim).astype(np.float32), 1.0, None,
                          gen.loras.of_user(r.user_id) if gen.loras.has(r.user_id) else None) for r in reqs]
    assert [c.lora.user_id if c.lora else None for c in conds] == ["ana", "ben", None]

    def diff(a, b) -> int:
        return int(np.abs(np.asarray(a, int) - np.asarray(b)).max())
    batch = gen.generate_batch(reqs, conds)
    alone = [gen.generate_batch([r], [c])[0] for r, c in zip(reqs, conds, strict=True)]
    without = [gen.generate_batch([r], [Conditioning(c.embedding, 1.0, None)])[0]
               for r, c in zip(reqs, conds, strict=True)]
    assert all(diff(b, a) <= 2 for b, a in zip(batch, alone, strict=True))  # each row: its own adapter only
    assert diff(alone[0], without[0]) > 10 and diff(alone[1], without[1]) > 10  # the adapters do something
    assert diff(alone[2], without[2]) == 0  # a user without one is untouched
    assert sorted(gen.loras.loaded()) == ["ana", "ben"]

    gen.loras.max_loaded = 1  # a smaller device: the least recently used adapter is unloaded
    gen.generate_batch([reqs[0]], [conds[0]])
    assert gen.loras.loaded() == ["ana"]
    with pytest.raises(ValueError, match="needs 2 LoRA adapters, at most 1 fit"):
        gen.generate_batch(reqs[:2], conds[:2])
    # A file serving cannot apply (LoRA on a convolution) fails with the reason; the worker then fails
    # that request alone and serves the rest of its batch.
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(4, 4), "unet.conv_in.lora_B.weight": torch.zeros(4, 4)},
              str(loras / "dora.safetensors"))
    with pytest.raises(ValueError, match="conv_in' is a Conv2d; only Linear layers are served"):
        gen.generate_batch([request("dora", "d")],
                           [Conditioning(conds[0].embedding, 1.0, None, gen.loras.of_user("dora"))])


def test_style_layers_only_injects_style_into_fewer_layers(generator):
    from stylestream.schemas.events import StyleVectorUpdated
    from stylestream.schemas.tables import FEATURE_NAMES

    rng = np.random.default_rng(3)
    style = StyleVectorUpdated(event_id="v", user_id="ana", event_time=datetime.now(UTC), version=1, photo_count=1,
                               embedding=rng.normal(size=64).tolist(), features=dict.fromkeys(FEATURE_NAMES, 0.7))
    plain = np.asarray(generator.generate(request("ana", "x"), None)[0], int)
    full = np.asarray(generator.generate(request("ana", "x"), style)[0], int)
    layers = np.asarray(generator.generate(request("ana", "x", style_layers_only=True), style)[0], int)
    assert np.abs(layers - plain).max() > 0  # still personalized...
    assert np.abs(layers - full).max() > 0  # ...but differently from injecting everywhere
    assert np.abs(layers - plain).mean() < np.abs(full - plain).mean()
    again = np.asarray(generator.generate(request("ana", "x"), style)[0], int)
    np.testing.assert_array_equal(again, full)  # the per-call scale does not leak into the next call


@pytest.mark.slow
def test_a_worker_killed_mid_stream_loses_no_request_and_makes_no_second_image(
        broker, make_ingestor, models_dir, diffusion, tmp_path):
    """Two worker processes in one group; the first is SIGKILLed with requests still to do. The other
    takes its partitions over: every request ends with exactly one image, and any request answered
    twice (its result out, its offset not yet committed) is answered identically."""
    import signal
    import subprocess
    import sys

    bs = broker.bootstrap_servers
    users = [f"user{i}" for i in range(4)]  # keys spread the requests over the partitions
    looks = ("warm", "cool", "mono", "pastel")
    photos = make_library(tmp_path / "lib", {u: [("a", look, 2)] for u, look in zip(users, looks, strict=True)})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    make_ingestor().run_until_caught_up()
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_dir, target_is_directory=True)
    out = tmp_path / "images"
    n = 48
    produce(bs, GENERATION_REQUESTS, [request(users[i % 4], f"r{i:03d}", seed=i) for i in range(n)])

    def worker(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "stylestream.cli.main", "serve", "-b", bs, "--data-dir",
                                 str(data), "--output", str(out), "--max-batch", "2", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    first = worker()
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*/*.png"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        second = worker("--idle-exit-s", "20")
        time.sleep(6)  # the second joins the group and takes some partitions over
        done_before_kill = len(list(out.glob("*/*.png")))
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert second.wait(timeout=300) == 0
    finally:
        first.kill()
    assert 4 <= done_before_kill < n, "the first worker must die with requests still to do"
    images = sorted(p.stem for p in out.glob("*/*.png"))
    assert images == [f"r{i:03d}" for i in range(n)]  # every request, one image each
    results: dict[str, list] = {}
    for m in read_topic(bs, GENERATION_RESULTS):
        r = parse_event(GENERATION_RESULTS, m.value)
        results.setdefault(r.request_id, []).append(r)
    assert sorted(results) == images
    for rid, answers in results.items():
        assert all(a.type == "generation_completed" for a in answers), answers
        assert all((a.image_uri, a.style_version) == (answers[0].image_uri, answers[0].style_version)
                   for a in answers), rid


def test_previews_are_spread_over_the_steps_and_never_the_last():
    assert preview_steps(4, 2) == [0, 1] and preview_steps(20, 3) == [4, 9, 14]
    assert preview_steps(4, 0) == [] and preview_steps(1, 3) == [] and preview_steps(2, 3) == [0]
