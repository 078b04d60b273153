"""Ingestion through faults and odd arrival orders: continuous mode and signals, an unreachable
broker, a damaged state file, late and out-of-order events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from helpers import produce, read_topic

from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.pipelines.store import Store, StoreError
from stylestream.streams import clients
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_VECTORS, dlq

T = datetime(2026, 2, 1, tzinfo=UTC)


def counted(ing) -> dict[str, int]:
    with Store(ing.cfg.db_path) as s:
        return {u: v[3] for u, v in s.latest_vectors().items()}


@pytest.mark.slow
def test_follow_mode_processes_new_events_and_stops_cleanly_on_sigterm(broker, clip, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 3)], "ben": [("b", "cool", 2)]})
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    (models / "clip").symlink_to(os.path.dirname(clip.pretrained))  # reuse the session's tiny model
    proc = subprocess.Popen([sys.executable, "-m", "stylestream.cli.main", "ingest", "--follow", "-b", bs,
                             "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[:3]])
        deadline = time.monotonic() + 90
        while len(read_topic(bs, STYLE_VECTORS)) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[3:]])
        while len(read_topic(bs, STYLE_VECTORS)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(read_topic(bs, STYLE_VECTORS)) == 2, "follow mode did not pick up the second batch"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "SIGTERM: finishing the cycle in progress" in out and "stopped after" in out
    assert "photos" in out and "lag 0" in out


@pytest.mark.smoke
def test_unreachable_broker_is_retried_and_ingestion_resumes(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 2)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    ing = make_ingestor(kafka_timeout_ms=1500)
    retries = []
    os.kill(broker.process.pid, signal.SIGSTOP)  # the broker stops answering, connections stay open
    try:
        worker = threading.Thread(target=lambda: ing.run(on_retry=lambda e, d: retries.append((e, d))))
        worker.start()
        deadline = time.monotonic() + 30
        while not retries and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    worker.join(timeout=120)
    assert retries, "no retry was reported while the broker was unreachable"
    assert not worker.is_alive()
    assert counted(ing) == {"ana": 2}


def test_a_producer_whose_sends_failed_is_closed_with_its_thread_while_the_broker_is_gone(broker):
    """After a failed cycle the ingestor drops its producer for a new one. kafka-python's own close()
    raises while the broker holds back the records' answers, and its network thread stays: one
    more for each failed try of an outage."""
    producer = clients.producer(broker.bootstrap_servers, request_timeout_ms=1000)
    clients.acknowledged(producer, [producer.send(PHOTO_EVENTS, key=b"k", value=b"delivered")])
    network_thread = f"{producer.config['client_id']}-network-thread"
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        producer.send(PHOTO_EVENTS, key=b"k", value=b"never acknowledged")
        started = time.monotonic()
        clients.discard(producer, timeout_s=1)
        assert time.monotonic() - started < 10
        assert network_thread not in {t.name for t in threading.enumerate()}
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)


def test_damaged_state_file_gives_a_clear_error_and_is_left_alone(broker, make_ingestor, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.duckdb").write_bytes(b"this is not a database" * 1000)
    before = (state / "state.duckdb").read_bytes()
    with pytest.raises(StoreError, match=r"cannot open the state database .* restore it from a backup"):
        make_ingestor()
    assert (state / "state.duckdb").read_bytes() == before


def test_opt_out_that_arrives_before_its_photo_still_wins(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("trip", "warm", 2), ("home", "cool", 2)]})
    ing = make_ingestor()
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "trip", False, T)])
    ing.run_until_caught_up()
    produce(bs, PHOTO_EVENTS, [p.upload_event(event_time=T - timedelta(days=1)) for p in photos])  # older events
    ing.run_until_caught_up()
    assert counted(ing) == {"ana": 2}
    with Store(ing.cfg.db_path) as s:
        assert {p for p, *_ in s.contributions("ana")} == {p.photo_id for p in photos if p.album_id == "home"}


def test_late_upload_into_withdrawn_album_is_never_counted(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("trip", "warm", 3)]})
    ing = make_ingestor()
    produce(bs, PHOTO_EVENTS, [photos[0].upload_event()])
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "trip", False, T)])
    ing.run_until_caught_up()
    produce(bs, PHOTO_EVENTS, [p.upload_event(event_time=T + timedelta(days=3)) for p in photos[1:]])  # later
    ing.run_until_caught_up()
    assert counted(ing).get("ana", 0) == 0
    with Store(ing.cfg.db_path) as s:
        assert s.contributions("ana") == []


def test_re_enabled_album_brings_back_only_photos_still_stored(broker, make_ingestor, tmp_path):
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("trip", "warm", 3)]})
    ing = make_ingestor()
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "trip", False, T)])
    ing.run_until_caught_up()
    photos[0].path.unlink()  # the photo service no longer has this one
    produce(bs, CONSENT_EVENTS, [toggle_event("ana", "album", "trip", True, T + timedelta(days=1))])
    ing.run_until_caught_up()
    assert counted(ing) == {"ana": 2}
    [letter] = read_topic(bs, dlq(PHOTO_EVENTS))
    assert b"cannot read" in letter.value


@pytest.mark.slow
def test_full_disk_gives_a_clear_error_and_loses_nothing_committed(broker, make_ingestor, clip, tmp_path):
    import resource

    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 5)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[:2]])
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "clip").symlink_to(os.path.dirname(clip.pretrained))
    cmd = [sys.executable, "-m", "stylestream.cli.main", "ingest", "-b", bs, "--data-dir", str(data)]
    subprocess.run(cmd, check=True, capture_output=True)
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos[2:]])

    def small_disk():  # no file may grow past 2 kB: the commit's write-ahead log cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    full = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_disk, env={**os.environ,
                                                                                           "COLUMNS": "300"})
    assert full.returncode != 0
    assert "disk full?" in full.stdout + full.stderr and "everything before it is intact" in full.stdout + full.stderr

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    with Store(data / "state" / "state.duckdb") as s:
        versions = s.db.execute("SELECT version, photo_count FROM style_versions ORDER BY version").fetchall()
    assert versions == [(1, 2), (2, 5)]
