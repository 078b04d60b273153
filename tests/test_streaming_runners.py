"""The streaming pipeline, run unbounded on Prism (Beam's portable runner) against a real broker,
gives the same styles and dead letters as the local driver over the same messy stream.

Version numbers are not compared: the local driver counts a version per cycle, the streaming
pipeline per event, so they number (and withdraw) different versions of the same styles.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.demo.synthetic import messy_stream
from stylestream.schemas.dead_letters import read_dead_letter
from stylestream.schemas.events import StyleVectorUpdated, parse_event
from stylestream.streams import clients
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import INGEST_TOPICS, STYLE_VECTORS, dlq, ensure_topics

N_EVENTS = 2000


def produce(bootstrap: str, stream) -> None:
    p = clients.producer(bootstrap, linger_ms=20)
    for topic, key, value in stream:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()


def latest_styles(bootstrap: str) -> dict[str, StyleVectorUpdated]:
    latest = {}
    for m in clients.read_all(bootstrap, STYLE_VECTORS):
        v = parse_event(STYLE_VECTORS, m.value)
        if v.version > getattr(latest.get(v.user_id), "version", 0):
            latest[v.user_id] = v
    return latest


def dead_letters(bootstrap: str) -> dict[tuple[str, int, int], tuple[str, str]]:
    out = {}
    for topic in INGEST_TOPICS:
        for m in clients.read_all(bootstrap, dlq(topic)):
            d = read_dead_letter(m.value)
            out[(d["topic"], d["partition"], d["offset"])] = (d["stage"], d["reason"])
    return out


def style_differences(want: dict[str, StyleVectorUpdated], got: dict[str, StyleVectorUpdated]) -> list[str]:
    """Per user: the last style vector and features (within 1e-6), photo count and facets."""
    out = [f"{u}: only {'locally' if u in want else 'streamed'}" for u in sorted(set(want) ^ set(got))]
    for u in sorted(set(want) & set(got)):
        w, g = want[u], got[u]
        if g.photo_count != w.photo_count:
            out.append(f"{u}: {g.photo_count} photos streamed, {w.photo_count} locally")
        elif not (np.allclose(g.embedding, w.embedding, atol=1e-6)
                  and np.allclose(list(g.features.values()), list(w.features.values()), atol=1e-6)):
            out.append(f"{u}: style differs")
        elif [f.photo_count for f in g.facets] != [f.photo_count for f in w.facets] or not all(
                abs(gf.weight_share - wf.weight_share) < 1e-6 and np.allclose(gf.embedding, wf.embedding, atol=1e-6)
                for gf, wf in zip(g.facets, w.facets, strict=True)):
            out.append(f"{u}: facets differ")
    return out


@pytest.mark.slow
def test_prism_matches_the_local_driver_over_a_messy_stream(broker, broker_engine, make_ingestor, clip, tmp_path):
    stream = messy_stream(tmp_path / "images", N_EVENTS, users=30, seed=14)
    assert len(stream) >= N_EVENTS
    produce(broker.bootstrap_servers, stream)

    # 1. The local driver, to the end of the stream.
    ing = make_ingestor()
    ing.run_until_caught_up()
    want, want_dead = latest_styles(broker.bootstrap_servers), dead_letters(broker.bootstrap_servers)
    assert len(want) >= 25 and len(want_dead) >= 30  # the stream reaches most users, and has malformed events

    # 2. The streaming pipeline on Prism, over the same stream on a broker of its own, until it has
    # caught up (its answers equal the local ones) or the deadline passes.
    with start_local_broker(broker_engine, tmp_path / "kafka-stream") as other:
        ensure_topics(other.bootstrap_servers)
        produce(other.bootstrap_servers, stream)
        log = open(tmp_path / "streaming.log", "w")
        job = subprocess.Popen(
            [sys.executable, "-m", "stylestream.pipelines.streaming", "--bootstrap-servers", other.bootstrap_servers,
             "--data-dir", str(tmp_path / "stream"), "--clip-model", clip.model, "--clip-pretrained", clip.pretrained],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 420
            while time.monotonic() < deadline and job.poll() is None:
                time.sleep(5)
                got, got_dead = latest_styles(other.bootstrap_servers), dead_letters(other.bootstrap_servers)
                if not style_differences(want, got) and got_dead == want_dead:
                    break
        finally:
            job.send_signal(signal.SIGTERM)
            rc = job.wait(60)
            log.close()
    assert rc == 0, (tmp_path / "streaming.log").read_text()[-3000:]
    assert style_differences(want, got) == []
    assert got_dead == want_dead

    # 3. The streamed history: every published version once, under pseudonyms.
    key = load_or_create_key(tmp_path / "stream")
    history = pq.read_table(tmp_path / "stream" / "history").to_pylist()
    last = {}
    for r in history:
        last[r["user_id"]] = max(last.get(r["user_id"], 0), r["version"])
    assert last == {pseudonym(u, key): v.version for u, v in got.items()}
    assert len({(r["user_id"], r["version"]) for r in history}) == len(history)
