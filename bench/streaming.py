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
FlinkRunner, whose job server is not served by the Maven Central these machines reach; it runs at
each --flink-parallelism (on 2 cores the gain is bounded: `events_per_s_per_core` divides by the
cores it could use, min(parallelism, cores)). The stream holds forget requests; after each runner the
streaming ones' history writer (`stylestream history follow`) writes the history and erasures, and:
  identical_to_local   the latest style per user equals the local driver's (1e-6)
  forgotten_clean      the audit finds nothing of any forgotten person in that deployment
  history_identical    each person's latest history row equals the local driver's
Final line: JSON with those figures per runner.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq

from stylestream.analytics.pseudonyms import load_key, pseudonym
from stylestream.demo.synthetic import forgotten_for_good, make_library, messy_stream
from stylestream.pipelines.flink_setup import ensure_flink
from stylestream.pipelines.history_writer import HistoryWriter
from stylestream.pipelines.layout import DataLayout
from stylestream.pipelines.settings import IngestSettings
from stylestream.privacy.audit import audit, needles_for
from stylestream.schemas.events import encode_event, parse_event
from stylestream.streams import clients
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import PHOTO_EVENTS, STYLE_VECTORS, ensure_topics


def latest_styles(bootstrap: str) -> dict[str, tuple]:
    latest = {}
    for m in clients.read_all(bootstrap, STYLE_VECTORS):  # a forgotten person's tombstones clear them
        v = parse_event(STYLE_VECTORS, m.value) if m.value is not None else None
        if v is None or v.tombstone:
            latest.pop(m.key.decode(), None)
        elif v.version > latest.get(v.user_id, (0,))[0]:
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
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:  # it had ended, its session with it
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


def last_history_rows(data_dir: Path, users: set[str]) -> dict[str, tuple[int, np.ndarray]]:
    """Each of `users`' latest history row: (photo count, embedding), by user id (from the deployment's
    own pseudonyms)."""
    state = DataLayout(data_dir).state
    if not state.history.exists():
        return {}
    key = load_key(state.analytics_key)
    named = {pseudonym(u, key): u for u in users}
    rows = pq.read_table(state.history, columns=["user_id", "version", "photo_count", "embedding"]).to_pylist()
    rows.sort(key=lambda r: r["version"])  # the latest last: it wins
    # (the steady-rate phase's people are each runner's own: not compared)
    return {named[r["user_id"]]: (r["photo_count"], np.array(r["embedding"])) for r in rows if r["user_id"] in named}


def forgotten_clean(bootstrap: str, data_dir: Path, forgotten: list[str]) -> bool:
    """The audit finds nothing of the forgotten people in the deployment (but what the broker removes itself)."""
    state = DataLayout(data_dir).state
    findings = audit(state, DataLayout(data_dir).images, needles_for(forgotten, [], state), bootstrap,
                     users=forgotten)
    return not [f for f in findings if f.violation]


def after_run(bootstrap: str, data_dir: Path, users: set[str], forgotten: list[str], local_history: dict | None,
              streaming: bool) -> dict:
    """The history writer for a streaming runner, then the privacy and history figures."""
    if streaming:
        with HistoryWriter(bootstrap, IngestSettings(data_dir)) as writer:
            writer.run(threading.Event(), follow=False)
    history = last_history_rows(data_dir, users)
    differ = [] if local_history is None else history_differences(local_history, history)
    if differ:
        print(f"history differs from the local driver's: {differ}", file=sys.stderr)
    return {"forgotten_clean": forgotten_clean(bootstrap, data_dir, forgotten), "history_identical": not differ,
            "history": history}


def history_differences(want: dict, got: dict) -> list[str]:
    """People whose latest history rows differ; one with no photo counted may have rows on one side only
    (a runner that met an upload and its deletion apart published them, one that met them together did not)."""
    counted = {u for rows in (want, got) for u, (count, _) in rows.items() if count}
    return sorted(u for u in counted if u not in want or u not in got or want[u][0] != got[u][0]
                  or not np.allclose(want[u][1], got[u][1], atol=1e-6))


def measure(name: str, cmd_backlog: list[str] | None, cmd_follow: list[str], bootstrap: str, work: Path,
            reference: dict | None, a) -> tuple[dict, dict]:
    """Backlog then steady rate for one runner. Returns (figures, its latest styles after the backlog)."""
    t0, t0_wall = time.monotonic(), time.time()
    first_output = None
    proc = None
    try:  # whatever happens, the runner started here is stopped here
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
        time.sleep(3)
        latencies = steady_latency(bootstrap, work, a.rate, a.duration, f"steady-{name}-")
    finally:
        if proc is not None:
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
    ap.add_argument("--flink-parallelism", type=int, nargs="+", default=[1, 2, 4], metavar="N",
                    help="run the Flink job at each of these (topics have 4 partitions)")
    ap.add_argument("--runners", nargs="+", default=["local", "prism", "flink"], choices=["local", "prism", "flink"])
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stream = messy_stream(work / "images", a.events, a.users, seed=3, forget_share=0.01)
        users = {k.decode() for _, k, _ in stream}
        forgotten = sorted(forgotten_for_good(stream))
        runs, reference, local_history = [], None, None

        def run(name: str, command, parallelism: int, streaming: bool) -> dict:
            nonlocal reference, local_history
            data = work / name
            with start_local_broker("kafka", work / f"kafka-{name}") as broker:
                bs = broker.bootstrap_servers
                ensure_topics(bs)
                clients.send_all(bs, stream)
                figures, styles = measure(name.split("-")[0], *command(bs, data), bs, work, reference, a)
                figures |= {"parallelism": parallelism, "events_per_s_per_core":
                            round(figures["events_per_s"] / min(parallelism, cores), 1)}
                checks = after_run(bs, data, users, forgotten, local_history, streaming)
            if reference is None:
                reference, local_history = styles, checks["history"]
            figures |= {k: v for k, v in checks.items() if k != "history"}
            print(json.dumps(figures), file=sys.stderr, flush=True)
            runs.append(figures)
            return figures

        def local_cmd(bs: str, data: Path):
            ingest = [sys.executable, "-m", "stylestream.cli.main", "ingest", "-b", bs, "--data-dir", str(data)]
            return [*ingest, "--until-caught-up"], [*ingest, "--follow"]

        def prism_cmd(bs: str, data: Path):
            return None, [sys.executable, "-m", "stylestream.pipelines.streaming", "--bootstrap-servers", bs,
                          "--data-dir", str(data)]

        def flink_cmd(parallelism: int):
            return lambda bs, data: (None, [str(ensure_flink()), "-m", "stylestream.pipelines.flink_job",
                                            "--bootstrap-servers", bs, "--data-dir", str(data),
                                            "--parallelism", str(parallelism)])

        local = run("local", local_cmd, 1, streaming=False)  # always: the reference
        if "prism" in a.runners:
            run("prism", prism_cmd, 1, streaming=True)
        if "flink" in a.runners:
            for parallelism in a.flink_parallelism:
                run(f"flink-p{parallelism}", flink_cmd(parallelism), parallelism, streaming=True)
        print(f"{'runner':<8}{'par.':>5}{'backlog s':>10}{'events/s':>10}{'per core':>9}{'first out s':>12}"
              f"{'p50 s':>8}{'p99 s':>8}{'identical':>10}{'forgotten clean':>16}{'history same':>13}")
        for r in runs:
            print(f"{r['runner']:<8}{r['parallelism']:>5}{r['backlog_s']:>10}{r['events_per_s']:>10}"
                  f"{r['events_per_s_per_core']:>9}{r['first_output_s']!s:>12}{r['latency_p50_s']!s:>8}"
                  f"{r['latency_p99_s']!s:>8}{r['identical_to_local']!s:>10}{r['forgotten_clean']!s:>16}"
                  f"{r['history_identical']!s:>13}")
        print(json.dumps({"bench": "streaming", "events": a.events, "cores": cores, "runners": runs,
                          "events_per_s_over_local": {f"{r['runner']}-p{r['parallelism']}":
                                                      round(r["events_per_s"] / local["events_per_s"], 2)
                                                      for r in runs}}))


if __name__ == "__main__":
    main()
