"""Every Kafka codec in, zstd out: records compressed with gzip, snappy, lz4 or zstd by Apache Kafka's
Java client (not kafka-python, as a photo service's own producers are) are read by ingestion and the
project's readers; the project's producers compress; a reader that lacks a codec stops in one line."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_topic

from stylestream.demo.synthetic import make_library
from stylestream.pipelines.store import Store
from stylestream.schemas.events import encode_event
from stylestream.streams import kafka_broker
from stylestream.streams.topics import PHOTO_EVENTS, STYLE_VECTORS

CODECS = ("gzip", "snappy", "lz4", "zstd")
JAVA_PRODUCER = Path(__file__).parent / "java" / "CompressedProducer.java"


def java_produce(bootstrap_servers: str, codec: str, messages: list[tuple[str, bytes, bytes]]) -> None:
    """(topic, key, value) messages through Kafka's Java client, compressed with `codec`."""
    java = kafka_broker.java_binary()
    if java is None:
        pytest.skip("needs a Java runtime: the records come from Kafka's Java client")
    lines = "".join(f"{t}\t{base64.b64encode(k).decode()}\t{base64.b64encode(v).decode()}\n" for t, k, v in messages)
    done = subprocess.run([java, "-cp", f"{kafka_broker.kafka_jars()}/*", str(JAVA_PRODUCER), bootstrap_servers,
                           codec], input=lines, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert f"{len(messages)} records sent with {codec}" in done.stdout


@pytest.fixture
def library(tmp_path):
    return make_library(tmp_path / "library", {f"by-{codec}": [("album", "warm", 2)] for codec in CODECS})


def uploads(library, codec: str) -> list[tuple[str, bytes, bytes]]:
    return [(PHOTO_EVENTS, p.user_id.encode(), encode_event(p.upload_event()))
            for p in library if p.user_id == f"by-{codec}"]


def test_every_codec_from_the_java_client_is_read_and_ingested(broker, make_ingestor, library):
    bs = broker.bootstrap_servers
    for codec in CODECS:
        java_produce(bs, codec, uploads(library, codec))

    # 1. The readers (the CLI's, the audit's, serving's) get every record back, byte for byte.
    got = sorted((m.key, m.value) for m in read_topic(bs, PHOTO_EVENTS))
    assert got == sorted((k, v) for codec in CODECS for _, k, v in uploads(library, codec))

    # 2. Ingestion counts every photo of every person.
    ing = make_ingestor()
    ing.run_until_caught_up()
    with Store(ing.cfg.db_path) as s:
        assert {u: v[3] for u, v in s.latest_vectors().items()} == {f"by-{codec}": 2 for codec in CODECS}

    # 3. What the project wrote is compressed with zstd, as the broker's own log says (the batches of
    #    data; with transactions each batch is followed by an uncompressed commit marker).
    if broker.data_dir is not None and broker.engine == "kafka":
        segments = sorted(broker.data_dir.glob(f"logs/{STYLE_VECTORS}-*/*.log"))
        dump = subprocess.run([kafka_broker.java_binary(), "-cp", f"{kafka_broker.kafka_jars()}/*",
                               "kafka.tools.DumpLogSegments", "--files", ",".join(map(str, segments))],
                              capture_output=True, text=True, timeout=120)
        codecs = {line.split("compresscodec: ")[1].split()[0] for line in dump.stdout.splitlines()
                  if "isControl: false" in line}  # a transaction's commit markers are never compressed
        assert codecs == {"zstd"}, dump.stdout[-2000:] + dump.stderr[-2000:]


def test_a_reader_without_the_codec_stops_in_one_line(broker, clip, library, tmp_path):
    bs = broker.bootstrap_servers
    java_produce(bs, "snappy", uploads(library, "snappy"))
    # An installation without python-snappy: its import fails, so kafka-python has no snappy codec.
    no_snappy = tmp_path / "no-snappy"
    no_snappy.mkdir()
    (no_snappy / "snappy.py").write_text("raise ImportError('python-snappy is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{no_snappy}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stylestream.cli.main", "ingest", "-b", bs, "--data-dir",
                           str(tmp_path / "data"), "--clip-pretrained", clip.pretrained, "--until-caught-up"],
                          capture_output=True, text=True, env=env, timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "codec" in errors[0] and "snappy" in errors[0].lower(), done.stdout
    assert "retrying" not in done.stdout, done.stdout  # stopped, not waited out
    print(f"stopped after {took:.1f} s")  # model loading included; no retry waits


def test_only_what_waiting_can_fix_is_retried():
    from kafka.errors import (
        KafkaConnectionError,
        KafkaTimeoutError,
        MessageSizeTooLargeError,
        TopicAuthorizationFailedError,
        UnknownTopicOrPartitionError,
        UnsupportedCodecError,
    )

    from stylestream.streams.clients import BrokerUnreachable, retriable

    assert all(retriable(e) for e in (KafkaConnectionError(), KafkaTimeoutError(), TimeoutError(),
                                      BrokerUnreachable("no broker")))
    assert not any(retriable(e) for e in (UnsupportedCodecError(), MessageSizeTooLargeError(),
                                          TopicAuthorizationFailedError(), UnknownTopicOrPartitionError()))
