"""Past one broker: a three-node Apache Kafka cluster (replication 3, min.insync.replicas 2) loses the
leader of the photo-events partitions under running ingestion and serving: nothing is lost and
nothing is published twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import dead_letters, latest_styles, produce, read_topic
from kafka import KafkaAdminClient

from stylestream.demo.synthetic import make_library
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.schemas.events import GenerationRequested, parse_event
from stylestream.serving.generator import StyleGenerator
from stylestream.serving.worker import ServeConfig, Worker
from stylestream.streams import clients
from stylestream.streams.broker import Engine, choose_engine
from stylestream.streams.kafka_broker import start_kafka_cluster
from stylestream.streams.topics import (
    GENERATION_REQUESTS,
    GENERATION_RESULTS,
    PHOTO_EVENTS,
    STYLE_VECTORS,
    broker_config,
    ensure_topics,
)

ENGINE, WHY = choose_engine(Engine.auto)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ENGINE != Engine.kafka, reason=f"a Kafka cluster cannot run here: {WHY}")]
PEOPLE = [f"p{i}" for i in range(8)]


def leaders(bs: str, topic: str) -> dict[int, int]:
    """partition -> the node leading it, and each partition's replica count checked on the way."""
    admin = KafkaAdminClient(bootstrap_servers=bs)
    try:
        [described] = admin.describe_topics([topic])
    finally:
        admin.close()
    assert all(len(p["replica_nodes"]) == 3 for p in described["partitions"])
    return {p["partition_index"]: p["leader_id"] for p in described["partitions"]}


def requests(ids: list[str]) -> list[GenerationRequested]:
    return [GenerationRequested(event_id=f"e-{r}", user_id=PEOPLE[i % 3], event_time=datetime.now(UTC),
                                request_id=r, prompt="a card") for i, r in enumerate(ids)]


def wait_until(check, what, timeout_s: float = 90.0) -> None:
    """Until check(); `what()` says what was seen when it times out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what()}"
        time.sleep(1)


def test_a_leader_killed_under_ingestion_and_serving_loses_nothing_and_doubles_nothing(tmp_path, clip, diffusion):
    photos = make_library(tmp_path / "lib", {p: [("a", "warm", 3)] for p in PEOPLE})
    first = [p for p in photos if p.photo_id.endswith(("0", "1"))]
    later = [p for p in photos if p not in first]
    with start_kafka_cluster(tmp_path / "cluster", nodes=3) as cluster:
        bs = cluster.bootstrap_servers
        ensure_topics(bs)
        assert broker_config(bs)["min.insync.replicas"] == "2"
        stop = threading.Event()
        # A short Kafka timeout: a publish the dead node holds up is retried with a new producer within it
        ingestor = Ingestor(IngestConfig(bs, tmp_path / "state", clip, kafka_timeout_ms=10_000))
        worker = Worker(ServeConfig(bs, str(tmp_path / "images")), StyleGenerator(diffusion, clip, device="cpu"))
        served: list[int] = []
        retried: list[str] = []  # what ingestion met and retried, for a failure's message
        on_retry = lambda e, delay: retried.append(f"{time.monotonic():.0f} {clients.describe(e)}")  # noqa: E731
        threads = [threading.Thread(target=ingestor.run, args=(stop, True), kwargs={"on_retry": on_retry},
                                    daemon=True),
                   threading.Thread(target=lambda: served.append(worker.run(max_requests=6, stop=stop)), daemon=True)]
        for t in threads:
            t.start()
        try:
            # 1. Two photos each, ingested; three generation requests
            produce(bs, PHOTO_EVENTS, [p.upload_event() for p in first])
            wait_until(lambda: latest_styles(bs).keys() >= set(PEOPLE), lambda: f"styles of {latest_styles(bs).keys()}")
            produce(bs, GENERATION_REQUESTS, requests(["r1", "r2", "r3"]))
            # 2. The node leading most photo-events partitions dies; the rest of the photos and three
            #    more requests arrive meanwhile
            led = Counter(leaders(bs, PHOTO_EVENTS).values())
            victim = led.most_common(1)[0][0]
            cluster.kill(victim)
            produce(bs, PHOTO_EVENTS, [p.upload_event() for p in later])
            produce(bs, GENERATION_REQUESTS, requests(["r4", "r5", "r6"]))
            # 3. Every photo counted, every request answered, by the two nodes left
            wait_until(lambda: all(s.photo_count == 3 for s in latest_styles(bs).values())
                       and len(latest_styles(bs)) == len(PEOPLE),
                       lambda: f"photos counted {({u: s.photo_count for u, s in latest_styles(bs).items()})}, "
                               f"ingestion retried {retried}")
            threads[1].join(120)
            assert served == [6]
            assert victim not in leaders(bs, PHOTO_EVENTS).values()
        finally:
            stop.set()
            threads[0].join(60)
            ingestor.close()
            worker.close()
        # Nothing twice: each style version and each result published once (read committed)
        versions = Counter((m.key, parse_event(STYLE_VECTORS, m.value).version)
                           for m in read_topic(bs, STYLE_VECTORS) if m.value)
        assert versions and max(versions.values()) == 1, [k for k, n in versions.items() if n > 1]
        results = Counter(parse_event(GENERATION_RESULTS, m.value).request_id
                          for m in read_topic(bs, GENERATION_RESULTS))
        assert results == Counter({r: 1 for r in ["r1", "r2", "r3", "r4", "r5", "r6"]})
        assert dead_letters(bs) == {}


def test_the_broker_command_runs_a_three_node_cluster_until_stopped(tmp_path):
    proc = subprocess.Popen([str(Path(sys.executable).parent / "stylestream"), "broker", "--nodes", "3",
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export STYLESTREAM_BOOTSTRAP_SERVERS="):
                break
        bs = lines[-1].strip().split("=", 1)[1]
        assert len(bs.split(",")) == 3, lines
        assert len(leaders(bs, PHOTO_EVENTS)) == 4  # four partitions, three replicas each
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        finally:
            proc.kill()  # a no-op once it has exited
    assert code == 0 and "stopping broker" in proc.stdout.read()
