"""The bundled Apache Kafka broker (KRaft, one node): starts from Maven Central jars, keeps topics,
data and committed offsets across a SIGKILL and a restart on the same log directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from kafka import KafkaConsumer, TopicPartition

from stylestream.streams import clients, kafka_broker
from stylestream.streams.broker import Engine, choose_engine
from stylestream.streams.broker_process import free_port
from stylestream.streams.kafka_broker import KAFKA_VERSION, start_kafka
from stylestream.streams.topics import PHOTO_EVENTS, ensure_topics

ENGINE, WHY = choose_engine(Engine.auto)
pytestmark = pytest.mark.skipif(ENGINE != Engine.kafka, reason=f"the bundled Kafka cannot run here: {WHY}")


@pytest.mark.slow
def test_kafka_keeps_topics_data_and_offsets_across_a_sigkill(tmp_path):
    port = free_port()
    broker = start_kafka(tmp_path / "kafka", port)
    try:
        ensure_topics(broker.bootstrap_servers)
        producer = clients.producer(broker.bootstrap_servers)
        for i in range(20):
            producer.send(PHOTO_EVENTS, key=f"user-{i % 5}".encode(), value=f"event-{i}".encode())
        producer.flush()
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id="keeps",
                                 auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000)
        consumer.subscribe([PHOTO_EVENTS])
        seen = [m.value for _, m in zip(range(8), consumer, strict=False)]
        consumer.commit()
        consumer.close()
    finally:
        broker.process.kill()  # no clean shutdown: what was acknowledged must survive anyway
        broker.process.wait()

    again = start_kafka(tmp_path / "kafka", port)
    try:
        assert sorted(m.value for m in clients.read_all(again.bootstrap_servers, PHOTO_EVENTS)) == sorted(
            f"event-{i}".encode() for i in range(20))
        consumer = KafkaConsumer(bootstrap_servers=again.bootstrap_servers, group_id="keeps",
                                 enable_auto_commit=False)
        committed = sum(consumer.committed(TopicPartition(PHOTO_EVENTS, p)) or 0
                        for p in consumer.partitions_for_topic(PHOTO_EVENTS))
        consumer.close()
        assert len(seen) == 8 and committed == 8
        assert "Kafka version: " + KAFKA_VERSION in (tmp_path / "kafka" / "broker.log").read_text()
    finally:
        again.stop()


@pytest.mark.slow
def test_broker_command_survives_kill_9_and_restart_with_its_data(tmp_path):
    port = free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "stylestream.cli.main", "broker", "--engine", "kafka",
                                 "--port", str(port), "--data-dir", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "COLUMNS": "300"})
        for line in proc.stdout:
            if "listening on" in line:
                assert f"Apache Kafka {KAFKA_VERSION}" in line and "started in" in line, line
                return proc
        raise AssertionError(f"broker command exited with {proc.wait()}")

    first = start()
    try:
        produce_values(f"127.0.0.1:{port}", [b"a", b"b", b"c"])
    finally:
        first.kill()  # kill -9: the Kafka process goes with it
        first.wait()
    second = start()
    try:
        assert sorted(m.value for m in clients.read_all(f"127.0.0.1:{port}", PHOTO_EVENTS)) == [b"a", b"b", b"c"]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        second.stdout.close()


def produce_values(bootstrap_servers: str, values: list[bytes]) -> None:
    producer = clients.producer(bootstrap_servers)
    for v in values:
        producer.send(PHOTO_EVENTS, key=b"ana", value=v)
    producer.flush()
    producer.close()


def test_a_cluster_id_that_starts_with_a_dash_formats(tmp_path):
    """Cluster ids are URL-safe base64, so one in 64 starts with "-": it must not read as an option."""
    java, classpath = kafka_broker._runtime()
    props = tmp_path / "server.properties"
    props.write_text(kafka_broker.server_properties(tmp_path, free_port(), free_port()))
    kafka_broker._format(java, classpath, tmp_path, props, "-" + "A" * 21)
    assert "cluster.id=-AAAA" in (tmp_path / "logs" / "meta.properties").read_text()


def test_each_new_broker_has_its_own_ids_and_a_known_one_keeps_its_own(tmp_path):
    """StorageTool's format is copied (one JVM start per Kafka version, not per broker): each copy with
    a cluster and directory id of its own."""
    java, classpath = kafka_broker._runtime()
    metas = []
    for name in ("a", "b"):
        kafka_broker._format_one_node(java, classpath, tmp_path / name)
        metas.append(dict(line.split("=", 1) for line in (tmp_path / name / "logs" / "meta.properties").read_text()
                          .splitlines() if "=" in line))
    a, b = metas
    assert a["cluster.id"] != b["cluster.id"] and a["directory.id"] != b["directory.id"]
    assert (a["node.id"], a["version"]) == (b["node.id"], b["version"]) == ("1", "1")
    before = (tmp_path / "a" / "logs" / "meta.properties").read_text()
    kafka_broker._format_one_node(java, classpath, tmp_path / "a")
    assert (tmp_path / "a" / "logs" / "meta.properties").read_text() == before
    with start_kafka(tmp_path / "b") as broker:  # and the copy is a log directory Kafka starts on
        ensure_topics(broker.bootstrap_servers)
