#!/usr/bin/env python
"""The local driver, the streaming pipeline on Prism and the Flink job, side by side over the same events.

Each runner gets a broker of its own (Apache Kafka on loopback) holding the same messy stream
(uploads, duplicates, deletions, opt-outs and opt-ins, malformed events), then:
  backlog      the runner starts and works through the stream: seconds until its latest style per
               user equals the local driver's (the local driver: `ingest --until-caught-up`), and
               the events per second that makes; `first_output_s`: start until its first style
               version is on the topic (start-up: Python, models, the runner, the first bundle)
  steady rate  it keeps running while --rate uploads per second arrive for --duration seconds,
               each for a new user: latency from the upload's send to its user's first style
               version (that message's Kafka timestamp, the same clock) p50 and p99
The runners run one after the other (2 cores). Flink is the Flink job (pipelines/flink_job.py, PyFlink
on a local Flink, 2-s checkpoints: its outputs are committed with each checkpoint), not Beam's
FlinkRunner, whose job server is not served by the Maven Central these machines reach.
Final line: JSON with those figures per runner and `identical_to_local` per runner.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from stylestream.demo.synthetic import make_library, messy_stream
from stylestream.pipelines.flink_setup import ensure_flink
from stylestream.schemas.events import encode_event, parse_event
from stylestream.streams import clients
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import PHOTO_EVENTS, STYLE_VECTORS, ensure_topics


def latest_styles(bootstrap: str) -> dict[str, tuple]:
    latest = {}
    for m in clients.read_all(bootstrap, STYLE_VECTORS):
        v = parse_event(STYLE_VECTORS, m.value)
        if v.version > latest.get(v.user_id, (0,))[0]:
            latest[v.user_id] = (v.version, v.photo_count, np.array(v.embedding), m.timestamp_ms)
    return latest


def same_styles(a: dict, b: dict) -> bool:
    """Same photo count and style per user; a user only one side has must have no photo counted there."""
    both = set(a) & set(b)
    return (all((a.get(u) or b.get(u))[1] == 0 for u in set(a) ^ set(b))
            and all(a[u][1] == b[u][1] and np.allclose(a[u][2], b[u][2], atol=1e-6) for u in both))


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # A session of its own, so that stopping it stops what it started (Prism, Flink's JVM and workers).
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def steady_latency(bootstrap: str, work: Path, rate: float, duration: float, tag: str) -> list[float]:
    """Uploads for new users at `rate` per second; seconds from each upload to its user's first version."""
    n = max(1, int(rate * duration))
    photos = make_library(work / f"steady-{tag}", {f"{tag}{i:04d}": [("a", "warm", 1)] for i in range(n)})
    p = clients.producer(bootstrap)
    sent = {}
    t0 = time.monotonic()
    for i, photo in enumerate(photos):
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        p.send(PHOTO_EVENTS, key=photo.user_id.encode(), value=encode_event(photo.upload_event(datetime.now(UTC))))
        sent[photo.user_id] = time.time() * 1000
    p.flush()
    p.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = {u: v for u, v in latest_styles(bootstrap).items() if u in sent}
        if len(got) == len(sent):
            break
        time.sleep(1)
    return [(got[u][3] - sent[u]) / 1000 for u in sorted(got)]


def measure(name: str, cmd_backlog: list[str] | None, cmd_follow: list[str], bootstrap: str, work: Path,
            reference: dict | None, a) -> tuple[dict, dict]:
    """Backlog then steady rate for one runner. Returns (figures, its latest styles after the backlog)."""
    t0, t0_wall = time.monotonic(), time.time()
    first_output = None
    if cmd_backlog:  # the local driver: one run to the end of the backlog, then --follow for the steady rate
        subprocess.run(cmd_backlog, check=True, capture_output=True, timeout=3600)
        backlog_s = time.monotonic() - t0
        styles = latest_styles(bootstrap)
        first_output = min(v[3] for v in styles.values()) / 1000 - t0_wall
        proc = start(cmd_follow, work / f"{name}.log")
    else:  # a streaming job: runs from the start and is polled until it has caught up
        proc = start(cmd_follow, work / f"{name}.log")
        deadline = t0 + a.deadline
        styles = {}
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            styles = latest_styles(bootstrap)
            if styles and first_output is None:
                first_output = time.monotonic() - t0
            if same_styles(styles, reference):
                break
        backlog_s = time.monotonic() - t0
    try:
        time.sleep(3)
        latencies = steady_latency(bootstrap, work, a.rate, a.duration, "steady")
    finally:
        stop(proc)
    figures = {"runner": name, "backlog_s": round(backlog_s, 1), "events_per_s": round(a.events / backlog_s, 1),
               "first_output_s": round(first_output, 1) if first_output is not None else None,
               "latency_p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
               "latency_p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
               "latency_samples": len(latencies),
               "identical_to_local": True if reference is None else same_styles(styles, reference)}
    print(json.dumps(figures), file=sys.stderr, flush=True)
    return figures, styles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--rate", type=float, default=2.0, help="uploads per second in the steady-rate phase")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the steady-rate phase")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds a streaming runner gets for the backlog")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stream = messy_stream(work / "images", a.events, a.users, seed=3)
        runs = []
        with start_local_broker("kafka", work / "kafka-local") as broker:
            ensure_topics(broker.bootstrap_servers)
            clients.send_all(broker.bootstrap_servers, stream)
            ingest = [sys.executable, "-m", "stylestream.cli.main", "ingest", "-b", broker.bootstrap_servers,
                      "--data-dir", str(work / "local")]
            local, reference = measure("local", [*ingest, "--until-caught-up"], [*ingest, "--follow"],
                                       broker.bootstrap_servers, work, None, a)
            runs.append(local)
        with start_local_broker("kafka", work / "kafka-prism") as broker:
            ensure_topics(broker.bootstrap_servers)
            clients.send_all(broker.bootstrap_servers, stream)
            job = [sys.executable, "-m", "stylestream.pipelines.streaming", "--bootstrap-servers",
                   broker.bootstrap_servers, "--data-dir", str(work / "prism")]
            prism, _ = measure("prism", None, job, broker.bootstrap_servers, work, reference, a)
            runs.append(prism)
        with start_local_broker("kafka", work / "kafka-flink") as broker:
            ensure_topics(broker.bootstrap_servers)
            clients.send_all(broker.bootstrap_servers, stream)
            job = [str(ensure_flink()), "-m", "stylestream.pipelines.flink_job", "--bootstrap-servers",
                   broker.bootstrap_servers, "--data-dir", str(work / "flink"), "--parallelism", "2"]
            flink, _ = measure("flink", None, job, broker.bootstrap_servers, work, reference, a)
            runs.append(flink)
        print(f"{'runner':<8}{'backlog s':>10}{'events/s':>10}{'first out s':>12}{'p50 s':>8}{'p99 s':>8}"
              f"{'identical':>11}")
        for r in runs:
            print(f"{r['runner']:<8}{r['backlog_s']:>10}{r['events_per_s']:>10}{r['first_output_s']!s:>12}"
                  f"{r['latency_p50_s']!s:>8}{r['latency_p99_s']!s:>8}{r['identical_to_local']!s:>11}")
        print(json.dumps({"bench": "streaming", "events": a.events, "runners": runs,
                          "events_per_s_over_local": {r["runner"]: round(r["events_per_s"] / local["events_per_s"], 2)
                                                      for r in runs}}))


if __name__ == "__main__":
    main()
