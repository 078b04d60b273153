#!/usr/bin/env python
"""Crash torture: SIGKILL ingestion at random moments, restart it, and compare with a clean run.

Makes a messy event stream (uploads, duplicates, deletions, album and photo opt-outs and opt-ins,
forget requests, event times out of order, some malformed events), produces the very same stream to two local
brokers, then:
  reference   `stylestream ingest --until-caught-up` once, undisturbed, against broker A
  tortured    the same command against broker B, killed with SIGKILL at a random moment --kills
              times and restarted each time, then left to finish; on Kafka, broker B itself is
              SIGKILLed under running ingestion --broker-kills times and restarted on its log
              directory (Tansu would come back empty, so it is never killed)
and compares the DuckDB state (every table, timestamps aside), the Parquet history (every committed
version exactly once, nothing uncommitted) and the last vector per user on each broker's
style-vectors topic, and counts the outputs the tortured run published more often than the reference
run did (read committed). Final line: JSON with a `seeds` map (per seed: kills, broker_kills,
identical, mismatches, duplicate_outputs), `all_identical` and the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import duckdb
import numpy as np
import pyarrow.parquet as pq

from stylestream.analytics.pseudonyms import KEY_FILE, load_or_create_key
from stylestream.demo.synthetic import messy_stream
from stylestream.schemas.events import parse_event
from stylestream.streams import clients
from stylestream.streams.broker import Engine, add_broker_option, kill_and_restart, start_local_broker
from stylestream.streams.topics import (
    DLQ_SOURCES,
    ERASURE_RECEIPTS,
    PHOTO_EVENTS,
    STYLE_MANIFESTS,
    STYLE_VECTORS,
    dlq,
    ensure_topics,
)

# Timestamps differ between any two runs; everything else must match.
# What ingestion writes: its outputs, and photo-events, where it re-publishes re-enabled uploads.
OUTPUT_TOPICS = (STYLE_VECTORS, STYLE_MANIFESTS, ERASURE_RECEIPTS, PHOTO_EVENTS, *(dlq(t) for t in DLQ_SOURCES))
TABLES = {
    "offsets": "topic, partition, next_offset",
    "cycles": "cycle, events, photos, dead_letters, users_updated, published, history_written",
    "consent": "user_id, scope_key, enabled, event_time, event_id",
    "tombstones": "user_id, photo_id, deleted_at",
    "photos": "user_id, photo_id, album_id, upload",
    "contributions": "user_id, photo_id, album_id, taken_at, weight, embedding, features, metadata, added_version",
    # The weighted sums, divided by the total weight: photo weights reach 2**26, so embeddings that
    # differ in their last float32 bit (batches of another size) move the raw sums by ~1 in 1e6.
    "user_stats": """user_id, version, photo_count, total_weight,
                     list_transform(sum_embedding, lambda x: x / nullif(total_weight, 0)),
                     list_transform(sum_features, lambda x: x / nullif(total_weight, 0))""",
    "style_versions": "user_id, version, cycle, photo_count, total_weight, embedding, features, facets, tombstone",
    "redactions": "cycle, user_id, from_version, to_version, applied",
    "outbox": "cycle, seq, topic",
    "pending_erasures": "cycle, user_id",
}


def ingest_cmd(bootstrap: str, data_dir: Path, per_partition: int) -> list[str]:
    return [sys.executable, "-m", "stylestream.cli.main", "ingest", "--until-caught-up", "-b", bootstrap,
            "--data-dir", str(data_dir), "--max-events-per-partition", str(per_partition)]


def run_to_end(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"ingestion failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def torture(cmd: list[str], kills: int, rng: random.Random, window: tuple[float, float],
            broker_kills_at: set[int], kill_broker: Callable[[], None]) -> tuple[int, int]:
    """SIGKILL ingestion `kills` times (and, at the kills numbered in `broker_kills_at`, the broker
    first, while ingestion runs on); then let it finish. Returns (ingestion kills, broker kills)."""
    done = broker_done = 0
    while done < kills:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(*window))
        if proc.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        if done + 1 in broker_kills_at:
            broker_kills_at = broker_kills_at - {done + 1}
            kill_broker()
            broker_done += 1
            time.sleep(rng.uniform(1.0, 4.0))  # ingestion reconnects and goes on before its own kill
            if proc.poll() is not None:  # it was starting and found no broker (no --follow): again
                continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
        print(json.dumps({"bench": "kill", "n": done, "broker_kills": broker_done}), file=sys.stderr, flush=True)
    run_to_end(cmd)
    return done, broker_done


def snapshot(data_dir: Path, bootstrap: str) -> dict:
    db = duckdb.connect(str(data_dir / "state" / "state.duckdb"), read_only=True)
    tables = {t: db.execute(f"SELECT {cols} FROM {t} ORDER BY ALL").fetchall() for t, cols in TABLES.items()}
    db.close()
    history = pq.read_table(data_dir / "state" / "history").drop(["updated_at", "date"]).to_pylist()
    latest = {}
    for m in clients.read_all(bootstrap, STYLE_VECTORS):  # a user's messages are in order on one partition
        if m.value is None:  # a forgotten person: what came before is gone
            latest.pop(m.key.decode(), None)
            continue
        v = parse_event(STYLE_VECTORS, m.value)
        if v.tombstone:
            latest.pop(v.user_id, None)
        elif v.version >= latest.get(v.user_id, (0,))[0]:
            latest[v.user_id] = (v.version, v.photo_count, v.embedding)
    return {"tables": tables, "history": sorted(history, key=lambda r: (r["user_id"], r["version"])),
            "topic_latest": latest}


def differences(a, b, path="") -> list[str]:
    """Where two snapshots differ (floats within 1e-6)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one run" for k in set(a) ^ set(b)]
        return out + [d for k in sorted(set(a) & set(b), key=str) for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if np.isclose(a, b, rtol=1e-6, atol=1e-6) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def output_counts(bootstrap: str) -> Counter:
    """How often each output was published, read committed: style vectors and manifests by (key,
    version), everything else the run writes by its bytes."""
    counts: Counter = Counter()
    for topic in OUTPUT_TOPICS:
        for m in clients.read_all(bootstrap, topic):
            versioned = topic in (STYLE_VECTORS, STYLE_MANIFESTS) and m.value is not None
            counts[(topic, m.key, parse_event(topic, m.value).version if versioned else m.value)] += 1
    return counts


def duplicate_outputs(reference: Counter, tortured: Counter) -> int:
    """Messages the tortured run published more often than the uninterrupted one (which repeats only
    what its input repeats)."""
    return sum(max(0, n - max(1, reference.get(k, 1))) for k, n in tortured.items())


def run_seed(a: argparse.Namespace, seed: int) -> dict:
    """One reference run and one tortured run over the messy stream of `seed`; what they ended with."""
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="crash-torture-"))
    stream = messy_stream(work, a.events, a.users, seed, forget_share=a.forget_share)
    brokers = [start_local_broker(a.broker, work / f"broker-{n}") for n in ("reference", "tortured")]
    broker_kills = a.broker_kills if brokers[1].engine == Engine.kafka else 0
    try:
        for b in brokers:
            ensure_topics(b.bootstrap_servers)
            clients.send_all(b.bootstrap_servers, stream)
        models = work / "models"
        key = load_or_create_key(work / "reference" / "state")  # one deployment: both runs share the key
        for name in ("reference", "tortured"):
            (work / name / "state").mkdir(parents=True, exist_ok=True)
            (work / name / "models").symlink_to(models, target_is_directory=True)
        (work / "tortured" / "state" / KEY_FILE).write_bytes(key)
        models.mkdir()
        ref, tor = (ingest_cmd(b.bootstrap_servers, work / n, a.max_events_per_partition)
                    for b, n in zip(brokers, ("reference", "tortured"), strict=True))
        t_ref = time.perf_counter()
        run_to_end(ref)
        ref_s = time.perf_counter() - t_ref
        print(json.dumps({"bench": "reference", "seed": seed, "seconds": round(ref_s, 1)}), flush=True)
        window = tuple(a.kill_window or (3.0, 3.0 + 1.5 * ref_s / a.kills))
        rng = random.Random(seed)

        def kill_broker() -> None:
            brokers[1] = kill_and_restart(brokers[1], rng.uniform(0.5, 3.0))
        at = {round((i + 1) * a.kills / (broker_kills + 1)) for i in range(broker_kills)}
        kills, broker_killed = torture(tor, a.kills, rng, window, at, kill_broker)
        mismatches = differences(snapshot(work / "reference", brokers[0].bootstrap_servers),
                                 snapshot(work / "tortured", brokers[1].bootstrap_servers))
        duplicates = duplicate_outputs(output_counts(brokers[0].bootstrap_servers),
                                       output_counts(brokers[1].bootstrap_servers))
    finally:
        for b in brokers:
            b.stop()
    for m in mismatches[:20]:
        print(json.dumps({"bench": "mismatch", "seed": seed, "where": m}), flush=True)
    return {"broker": brokers[1].engine, "kills": kills, "broker_kills": broker_killed, "events": len(stream),
            "forget_requests": sum(b'"user_forgotten"' in v for _, _, v in stream),
            "identical": not mismatches, "mismatches": len(mismatches), "duplicate_outputs": duplicates,
            "reference_s": round(ref_s, 1), "total_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--kills", type=int, default=20, help="ingestion SIGKILLs")
    add_broker_option(ap)
    ap.add_argument("--broker-kills", type=int, default=3,
                    help="SIGKILLs and restarts of the tortured run's broker (Kafka only)")
    ap.add_argument("--max-events-per-partition", type=int, default=400)
    ap.add_argument("--kill-window", type=float, nargs=2, default=None,
                    help="seconds after a start at which the kill lands (start-up takes a few); default: "
                         "from 3 s to 3 s + 1.5 x the reference run's time / kills, so every kill finds work")
    ap.add_argument("--forget-share", type=float, default=0.005, metavar="SHARE",
                    help="share of the events that are forget requests")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                    help="one messy stream, reference run and tortured run per seed")
    a = ap.parse_args()
    seeds = {str(seed): run_seed(a, seed) for seed in a.seeds}
    totals = {k: sum(r[k] for r in seeds.values()) for k in ("kills", "broker_kills", "duplicate_outputs")}
    print(json.dumps({"bench": "crash_torture", "broker": next(iter(seeds.values()))["broker"], "seeds": seeds,
                      "all_identical": all(r["identical"] for r in seeds.values()), **totals}))


if __name__ == "__main__":
    main()
