"""The local driver's outputs exactly once on Apache Kafka: each cycle's outbox goes out in one Kafka
transaction with a "published" marker under the state's own transactional.id, every send checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from conftest import TEST_BROKER
from helpers import produce, read_topic
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError, MessageSizeTooLargeError, ProducerFencedError

from stylestream.demo.synthetic import make_library
from stylestream.pipelines.store import Store
from stylestream.streams import clients
from stylestream.streams.topics import MAX_MESSAGE_BYTES, PHOTO_EVENTS, STYLE_MANIFESTS, STYLE_VECTORS


@pytest.fixture(autouse=True)
def needs_kafka():
    if TEST_BROKER.value != "kafka":
        pytest.skip("needs Apache Kafka (STYLESTREAM_TEST_BROKER=kafka): Tansu has no transactions")


@pytest.fixture
def library(tmp_path):
    return make_library(tmp_path / "library", {"ana": [("a", "warm", 2)], "ben": [("b", "cool", 2)]})


def published(bs: str) -> Counter:
    """Every committed style vector and manifest: how often each (topic, key, value) was published."""
    return Counter((t, m.key, m.value) for t in (STYLE_VECTORS, STYLE_MANIFESTS) for m in read_topic(bs, t))


def set_topic_config(bs: str, topic: str, **configs: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bs)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        admin.close()


def test_a_crash_between_the_kafka_commit_and_the_local_mark_publishes_nothing_twice(
        broker, make_ingestor, library, monkeypatch):
    bs = broker.bootstrap_servers
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in library])
    ing = make_ingestor()

    def crash(self, cycle):
        raise SystemExit("killed after the commit, before the local mark")
    monkeypatch.setattr(Store, "mark_published", crash)
    with pytest.raises(SystemExit):
        ing.run_until_caught_up()
    ing.close()
    out = published(bs)
    assert len(out) == 4 and set(out.values()) == {1}  # the cycle is out: two vectors, two manifests

    monkeypatch.undo()  # restarted on the same state: the marker says cycle 1 is out
    again = make_ingestor()
    assert again.run_until_caught_up() == []
    assert published(bs) == out
    with Store(again.cfg.db_path) as s:
        assert s.unpublished_cycles() == []


def test_a_record_the_broker_rejects_fails_its_cycle_and_the_next_run_publishes_it(broker, make_ingestor, library):
    bs = broker.bootstrap_servers
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in library])
    set_topic_config(bs, STYLE_MANIFESTS, **{"max.message.bytes": "200"})  # smaller than any manifest
    ing = make_ingestor()
    with pytest.raises(KafkaError) as refused:
        ing.run_until_caught_up()
    assert isinstance(clients.cause(refused.value), MessageSizeTooLargeError), refused.value
    assert published(bs) == Counter()  # none of the cycle, not even the vectors the broker took
    with Store(ing.cfg.db_path) as s:
        assert s.unpublished_cycles() == [1]

    set_topic_config(bs, STYLE_MANIFESTS, **{"max.message.bytes": str(MAX_MESSAGE_BYTES)})
    assert ing.run_until_caught_up() == []  # nothing new to read; the committed cycle goes out
    out = published(bs)
    assert len(out) == 4 and set(out.values()) == {1}


def test_a_second_ingestor_on_one_state_is_refused(broker, make_ingestor, library, clip, tmp_path):
    bs = broker.bootstrap_servers
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in library[:2]])
    first = make_ingestor(state="data/state")
    first.run_until_caught_up()

    # 1. On the same state directory: the state database is held.
    second = subprocess.run([sys.executable, "-m", "stylestream.cli.main", "ingest", "-b", bs, "--data-dir",
                             str(tmp_path / "data"), "--clip-pretrained", clip.pretrained, "--until-caught-up"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert second.returncode == 1, second.stdout + second.stderr
    errors = [line for line in second.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another ingestion holds it" in errors[0], second.stdout
    first.close()

    # 2. On a copy of the state: the copy's ingestor fences the first through their shared
    #    transactional.id, and the first is told so instead of publishing.
    shutil.copytree(tmp_path / "data" / "state", tmp_path / "copy")
    first = make_ingestor(state="data/state")
    make_ingestor(state="copy")
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in library[2:]])
    with pytest.raises(KafkaError) as fenced:
        first.run_until_caught_up()
    assert isinstance(clients.cause(fenced.value), ProducerFencedError), fenced.value
    assert "another ingestor took over" in clients.describe(fenced.value)

