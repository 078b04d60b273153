"""Faults only a durable broker can show: Apache Kafka SIGKILLed mid-cycle and restarted on its log
directory, down for 30 s under ingestion and serving, and compaction of the style-vectors topic."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from functools import partial

import numpy as np
import pytest
from helpers import produce, read_topic
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from prometheus_client import generate_latest

from stylestream.api.follower import Follower
from stylestream.api.store import ApiStore
from stylestream.demo.synthetic import make_library
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.pipelines.store import Store
from stylestream.schemas.events import GenerationRequested, StyleVectorUpdated, parse_event
from stylestream.serving.generator import StyleGenerator
from stylestream.serving.style_table import StyleTable
from stylestream.serving.worker import ServeConfig, Worker
from stylestream.streams.broker import LocalBroker, kill_and_restart
from stylestream.streams.topics import GENERATION_REQUESTS, PHOTO_EVENTS, STYLE_VECTORS, TOPIC_CONFIGS


@pytest.fixture
def kafka(broker) -> LocalBroker:
    if broker.engine != "kafka":
        pytest.skip("needs Apache Kafka (STYLESTREAM_TEST_BROKER=kafka): Tansu keeps nothing across a restart")
    return broker


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_broker_sigkilled_mid_cycle_ingestion_loses_and_doubles_nothing(kafka, make_ingestor, tmp_path):
    bs = kafka.bootstrap_servers
    users = {f"u{i}": [("a", look, 8)] for i, look in enumerate(("warm", "cool", "mono", "pastel"))}
    photos = make_library(tmp_path / "lib", users)
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    ing = make_ingestor("tortured", max_events_per_partition=2, kafka_timeout_ms=3000)
    second_cycle_done = threading.Event()
    done: list[int] = []  # the cycles, as they commit

    def on_cycle(r) -> None:
        done.append(r.cycle)
        if r.cycle == 2:
            second_cycle_done.set()
    ingesting = threading.Thread(target=ing.run, kwargs=dict(on_cycle=on_cycle), daemon=True)
    ingesting.start()
    assert second_cycle_done.wait(120)
    time.sleep(0.2)  # into the third cycle
    before_kill = len(done)
    # From this thread: a broker started from another thread dies when that thread ends (PDEATHSIG).
    # Down longer than the ingestor's 3-s Kafka timeout; a shorter outage its clients ride out.
    restarted = kill_and_restart(kafka, down_s=5.0)
    try:
        ingesting.join(timeout=180)
        assert not ingesting.is_alive() and len(done) > before_kill, done  # it was killed mid-stream

        with Store(ing.cfg.db_path) as s:  # nothing lost, nothing counted twice
            assert {u: v[3] for u, v in s.latest_vectors().items()} == {u: 8 for u in users}
            latest = {u: v[0] for u, v in s.latest_vectors().items()}
            versions = s.db.execute("SELECT user_id, version FROM style_versions ORDER BY ALL").fetchall()
        assert versions == [(u, v) for u in sorted(users) for v in range(1, latest[u] + 1)]
        published: dict[tuple[str, int], set[bytes]] = {}  # a cycle republished after the outage
        for m in read_topic(bs, STYLE_VECTORS):              # may repeat a message, never change one
            v = parse_event(STYLE_VECTORS, m.value)
            published.setdefault((v.user_id, v.version), set()).add(m.value)
        assert sorted(published) == versions and all(len(bodies) == 1 for bodies in published.values())

        reference = make_ingestor("reference")  # the same events, undisturbed
        reference.run_until_caught_up()
        with Store(ing.cfg.db_path) as a, Store(reference.cfg.db_path) as b:
            got, want = a.latest_vectors(), b.latest_vectors()
        for u in users:
            np.testing.assert_allclose(got[u][1], want[u][1], atol=1e-6)
    finally:
        restarted.stop()


@pytest.mark.slow
def test_broker_down_30_s_ingestion_and_serving_retry_and_recover(kafka, clip, diffusion, tmp_path):
    bs = kafka.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 4)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[:2]])
    stop, stop_serving = threading.Event(), threading.Event()
    ing = Ingestor(IngestConfig(bs, tmp_path / "state", clip, kafka_timeout_ms=3000, poll_interval_s=0.2))
    retries: list[Exception] = []
    ingesting = threading.Thread(target=ing.run, kwargs=dict(stop=stop, follow=True,
                                                              on_retry=lambda e, d: retries.append(e)))
    results = []
    brokers = [kafka]
    ingesting.start()
    worker = serving = follower = None
    api_store = ApiStore(tmp_path / "api" / "api.db")
    try:
        follower = Follower(bs, api_store).start()  # the API's
        wait_until(lambda: len(read_topic(bs, STYLE_VECTORS)) == 1, 120, "the first style version")
        worker = Worker(ServeConfig(bs, str(tmp_path / "images")), StyleGenerator(diffusion, clip, device="cpu"))
        serving = threading.Thread(target=worker.run, kwargs=dict(stop=stop_serving, on_result=results.append),
                                   daemon=True)  # a failed test must not wait for it
        serving.start()
        produce(bs, GENERATION_REQUESTS, [request("before")])
        wait_until(lambda: len(results) == 1, 120, "the first result")

        away: list[str | None] = []  # what the API's health endpoint says each second of the outage

        def watch() -> None:
            for _ in range(30):
                away.append(follower.failing())
                time.sleep(1)
        watching = threading.Thread(target=watch)
        watching.start()
        brokers.append(kill_and_restart(kafka, down_s=30.0))
        watching.join()
        produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[2:]])
        wait_until(lambda: len(read_topic(bs, STYLE_VECTORS)) == 2, 120, "ingestion to publish again")
        produce(bs, GENERATION_REQUESTS, [request("after", min_style_version=2)])
        wait_until(lambda: any(r.request_id == "after" for r in results), 180, "serving to recover and answer")
        # Every retry was reported: the health endpoint's reason while away, counts on /metrics.
        assert any(a and "broker unavailable" in a for a in away), away
        wait_until(lambda: follower.failing() is None, 60, "the API's follower to recover")
        for registry, prefix in ((worker.metrics.registry, "stylestream_serve_broker"),
                                 (follower.metrics.registry, "stylestream_api_follower")):
            # The gauge drops once the call that got through returns (a result is seen before that).
            wait_until(partial(gauge_is_zero, registry, f"{prefix}_failing"), 60, f"{prefix}_failing to drop")
            text = generate_latest(registry).decode()
            retried = [line for line in text.splitlines() if line.startswith(f"{prefix}_retries_total{{")]
            assert retried and sum(float(line.split()[-1]) for line in retried) > 0, text
        stop_serving.set()
        serving.join(timeout=60)
        assert not serving.is_alive(), "serving did not stop"
    finally:
        if follower is not None:
            follower.close()
        api_store.close()
        stop_serving.set()
        if serving is not None:
            serving.join(timeout=60)
        if worker is not None and not (serving and serving.is_alive()):
            worker.close()
        stop.set()
        ingesting.join(timeout=120)
        ing.close()
        brokers[-1].stop()
    assert retries, "ingestion met no error while the broker was down"
    # A request answered just before the broker died, but not yet committed, comes again and gets its
    # stored result once more (the same image): one outcome per request id.
    outcomes = {(r.request_id, r.type, r.style_version, r.image_uri) for r in results}
    assert sorted(o[:3] for o in outcomes) == [("after", "generation_completed", 2),
                                               ("before", "generation_completed", 1)]
    with Store(tmp_path / "state" / "state.duckdb") as s:
        assert s.latest_vectors()["ana"][3] == 4


def gauge_is_zero(registry, name: str) -> bool:
    return f"{name} 0.0" in generate_latest(registry).decode().splitlines()


def request(rid: str, **kw) -> GenerationRequested:
    return GenerationRequested(event_id=f"e-{rid}", user_id="ana", event_time=datetime.now(UTC), request_id=rid,
                               prompt="a birthday card", seed=1, **kw)


@pytest.mark.slow
def test_style_vectors_are_compacted_to_the_latest_version_per_user(kafka, clip, diffusion, tmp_path):
    bs = kafka.bootstrap_servers
    admin = KafkaAdminClient(bootstrap_servers=bs)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, STYLE_VECTORS)])
        topic = described["topic"][STYLE_VECTORS]
        assert {k: topic[k]["value"] for k in TOPIC_CONFIGS[STYLE_VECTORS]} == TOPIC_CONFIGS[STYLE_VECTORS]
        # Compact now rather than after the production lag: small segments, no lag, a cleaner that
        # looks every 200 ms (AlterConfigs replaces the topic's settings, so compact is named again).
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, STYLE_VECTORS, configs={
            "cleanup.policy": "compact", "segment.ms": "100", "min.compaction.lag.ms": "0",
            "min.cleanable.dirty.ratio": "0.01"})])
        admin.alter_configs([ConfigResource(ConfigResourceType.BROKER, "1", configs={
            "log.cleaner.backoff.ms": "200"})])
    finally:
        admin.close()

    def vector(user: str, version: int) -> StyleVectorUpdated:
        return StyleVectorUpdated(event_id=f"{user}-{version}", user_id=user, event_time=datetime.now(UTC),
                                  version=version, photo_count=version, embedding=[1.0, 0.0], features={})

    produce(bs, STYLE_VECTORS, [vector(u, v) for v in range(1, 6) for u in ("ana", "ben")])

    def compacted() -> bool:
        # A partition's last segment is never cleaned: a message after 100 ms rolls it (the latest
        # version again, as a republication after a crash would).
        time.sleep(0.3)
        produce(bs, STYLE_VECTORS, [vector("ana", 5), vector("ben", 5)])
        return all(parse_event(STYLE_VECTORS, m.value).version == 5 for m in read_topic(bs, STYLE_VECTORS))

    wait_until(compacted, 90, "the log cleaner")
    table = StyleTable(bs)  # a new worker's table: one value per user, read over the offset gaps
    try:
        table.catch_up()
        assert {u: table.get(u).version for u in ("ana", "ben")} == {"ana": 5, "ben": 5}
        assert table.get("ana", 2) is None
    finally:
        table.close()
    assert not any(m.offset == 0 for m in read_topic(bs, STYLE_VECTORS))

    produce(bs, GENERATION_REQUESTS, [request("pinned-to-a-compacted-version", style_version=2)])
    results = []
    with Worker(ServeConfig(bs, str(tmp_path / "images")), StyleGenerator(diffusion, clip, device="cpu")) as worker:
        worker.run(max_requests=1, on_result=results.append)
    assert results[0].type == "generation_failed" and "superseded by version 5" in results[0].reason
