"""The streaming pipeline on real runners against a real broker gives the same styles and dead letters
as the local driver over the same messy stream: unbounded on Prism (Beam's portable runner), and as
the Flink job (pipelines/flink_job.py) on Apache Flink, also when killed mid-stream and restored
from its last checkpoint.

Version numbers are not compared: the local driver counts a version per cycle, the streaming
pipeline per publish, so they number (and withdraw) different versions of the same styles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import dead_letters, latest_styles, style_differences

from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.demo.synthetic import messy_stream
from stylestream.pipelines.flink_setup import flink_python
from stylestream.schemas.events import parse_event
from stylestream.streams import clients
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import STYLE_VECTORS, ensure_topics

N_EVENTS = 2000


@pytest.fixture
def reference(broker, make_ingestor, tmp_path):
    """A messy stream of N_EVENTS, and the local driver's answer over it: (stream, styles, dead letters)."""
    stream = messy_stream(tmp_path / "images", N_EVENTS, users=30, seed=14)
    assert len(stream) >= N_EVENTS
    clients.send_all(broker.bootstrap_servers, stream)
    make_ingestor().run_until_caught_up()
    styles, dead = latest_styles(broker.bootstrap_servers), dead_letters(broker.bootstrap_servers)
    assert len(styles) >= 20 and len(dead) >= 30  # the stream reaches most users, and has malformed events
    return stream, styles, dead


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: the Flink job's JVM and Python workers go down with it.
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(bootstrap: str, want, want_dead, job: subprocess.Popen, deadline_s: float):
    """Polls the job's outputs until they equal the local driver's (or the deadline, or the job ends);
    `want_dead` None: the styles only."""
    deadline = time.monotonic() + deadline_s
    got, got_dead = {}, {}
    while time.monotonic() < deadline and job.poll() is None:
        time.sleep(5)
        got, got_dead = latest_styles(bootstrap), dead_letters(bootstrap)
        if not style_differences(want, got) and (want_dead is None or got_dead == want_dead):
            break
    return got, got_dead


@pytest.mark.slow
def test_prism_matches_the_local_driver_over_a_messy_stream(reference, broker_engine, clip, tmp_path):
    stream, want, want_dead = reference
    with start_local_broker(broker_engine, tmp_path / "kafka-stream") as other:
        ensure_topics(other.bootstrap_servers)
        clients.send_all(other.bootstrap_servers, stream)
        job = start([sys.executable, "-m", "stylestream.pipelines.streaming", "--bootstrap-servers",
                     other.bootstrap_servers, "--data-dir", str(tmp_path / "stream"), "--clip-model", clip.model,
                     "--clip-pretrained", clip.pretrained], tmp_path / "streaming.log")
        try:
            got, got_dead = wait_for(other.bootstrap_servers, want, want_dead, job, 420)
            # The history is written beside the topic: give its last bundle a moment.
            key = load_or_create_key(tmp_path / "stream")
            published = {pseudonym(u, key): v.version for u, v in got.items()}
            deadline = time.monotonic() + 30
            while (last := last_history_versions(tmp_path / "stream" / "history")) != published:
                if time.monotonic() > deadline:
                    break
                time.sleep(1)
        finally:
            job.send_signal(signal.SIGTERM)
            rc = job.wait(60)
    assert rc == 0, (tmp_path / "streaming.log").read_text()[-3000:]
    assert style_differences(want, got) == []
    assert got_dead == want_dead

    # The streamed history: every published version once, under pseudonyms; and no version that a
    # later one withdrew.
    assert last == published
    history = pq.read_table(tmp_path / "stream" / "history").to_pylist()
    assert len({(r["user_id"], r["version"]) for r in history}) == len(history)
    withdrawn = {(pseudonym(u, key), w) for u, v in got.items() for w in v.withdrawn_versions}
    assert not withdrawn & {(r["user_id"], r["version"]) for r in history}


def last_history_versions(history: Path) -> dict[str, int]:
    last = {}
    if history.exists():
        for r in pq.read_table(history, columns=["user_id", "version"]).to_pylist():
            last[r["user_id"]] = max(last.get(r["user_id"], 0), r["version"])
    return last


def flink_job(bootstrap: str, data_dir: Path, clip, *extra: str) -> list[str]:
    return [str(flink_python()), "-m", "stylestream.pipelines.flink_job", "--bootstrap-servers", bootstrap,
            "--data-dir", str(data_dir), "--clip-model", clip.model, "--clip-pretrained", clip.pretrained,
            "--parallelism", "2", "--checkpointing-interval-ms", "2000", *extra]


def needs_kafka(engine: str) -> None:
    if engine != "kafka":
        pytest.skip("needs Apache Kafka (STYLESTREAM_TEST_BROKER=kafka): the Flink job writes in Kafka "
                    "transactions, which Tansu does not have")


def kill(job: subprocess.Popen) -> None:
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(60)


def published_versions(bootstrap: str) -> dict[tuple[str, int], set]:
    """Every committed style-vector message, by (user, version): the contents published under it."""
    out: dict[tuple[str, int], set] = {}
    for m in clients.read_all(bootstrap, STYLE_VECTORS):
        v = parse_event(STYLE_VECTORS, m.value)
        out.setdefault((v.user_id, v.version), set()).add((v.photo_count, tuple(v.embedding)))
    return out


@pytest.mark.slow
def test_flink_matches_the_local_driver_over_a_messy_stream(reference, broker_engine, clip, tmp_path):
    needs_kafka(broker_engine)
    stream, want, want_dead = reference
    with start_local_broker(broker_engine, tmp_path / "kafka-flink") as other:
        ensure_topics(other.bootstrap_servers)
        clients.send_all(other.bootstrap_servers, stream)
        job = start(flink_job(other.bootstrap_servers, tmp_path / "flink", clip), tmp_path / "flink.log")
        try:
            got, got_dead = wait_for(other.bootstrap_servers, want, want_dead, job, 480)
            versions = published_versions(other.bootstrap_servers)
        finally:
            kill(job)
    assert style_differences(want, got) == [], (tmp_path / "flink.log").read_text()[-3000:]
    assert got_dead == want_dead
    assert all(len(contents) == 1 for contents in versions.values())


@pytest.mark.slow
def test_flink_killed_mid_stream_resumes_from_its_last_checkpoint(reference, broker_engine, clip, tmp_path):
    needs_kafka(broker_engine)
    stream, want, want_dead = reference
    with start_local_broker(broker_engine, tmp_path / "kafka-flink") as other:
        bs = other.bootstrap_servers
        ensure_topics(bs)
        log = tmp_path / "flink.log"
        # 1. The first half of the stream, until its versions are out (a checkpoint has completed);
        # then the second half, and SIGKILL the job while it works on it.
        half = len(stream) // 2
        clients.send_all(bs, stream[:half])
        job = start(flink_job(bs, tmp_path / "flink", clip), log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not latest_styles(bs) and job.poll() is None:
            time.sleep(1)
        clients.send_all(bs, stream[half:])
        time.sleep(3)
        kill(job)
        before_kill = latest_styles(bs)
        assert before_kill and style_differences(want, before_kill), "killed too late: nothing left to do"
        assert list((tmp_path / "flink" / "checkpoints").glob("*/chk-*/_metadata")), log.read_text()[-3000:]
        # 2. Restart from the newest checkpoint and let it finish.
        job = start(flink_job(bs, tmp_path / "flink", clip, "--restore", "latest"), log)
        try:
            got, got_dead = wait_for(bs, want, None, job, 480)
            versions = published_versions(bs)
        finally:
            kill(job)
    assert "restoring from" in log.read_text()
    assert style_differences(want, got) == [], log.read_text()[-3000:]
    # Every dead letter once, with its reason (the second half's offsets differ from the local
    # broker's: the job's re-ingested uploads went in between).
    assert Counter((t, p, why) for (t, p, _), why in got_dead.items()) == Counter(
        (t, p, why) for (t, p, _), why in want_dead.items())
    # No version was published twice with different content (a replay after the restore publishes
    # nothing its checkpoint did not cover; what the killed job had not committed was aborted).
    assert all(len(contents) == 1 for contents in versions.values()), [k for k, c in versions.items() if len(c) > 1]
