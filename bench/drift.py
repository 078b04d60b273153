#!/usr/bin/env python
"""Drift queries over a large history, with pandas on the same files as the baseline in the same run.

Generates USERS x VERSIONS style versions (one version per user per day, DIM-d embeddings that
wander at a per-user speed, the 23 features), written as the history layout ingestion and
`stylestream history compact` produce: each closed day one file per user bucket, sorted by user,
small row groups, and compaction's in-force snapshot of each closed day; the last day stays open, as
today's would, one cycle's file. Then times

  topn      the top-N drift query (version in force 30 days before the end vs the latest), DuckDB
  topn_scan the same query from every history row, without the snapshots (the baseline)
  timeline  one user's timeline (drift from first and previous version), DuckDB
  pandas    the same top-N computed with pandas from the same Parquet files (--no-pandas: not run;
            it holds every embedding as a Python object, tens of GB at 100 M rows)

Each query runs REPEATS times; the median is reported (the first run includes reading file footers).
`--dir D --reuse` times the queries again on the history an earlier run with `--dir D` left there.
Final line: JSON with rows, topn_query_s, topn_scan_s, timeline_query_s, pandas_topn_s and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from rich.progress import track

from stylestream.analytics import drift, history
from stylestream.analytics.pseudonyms import pseudonym
from stylestream.schemas.tables import FEATURE_NAMES, STYLE_HISTORY

START = datetime(2026, 1, 1, tzinfo=UTC)
KEY = b"bench-analytics-key" * 2  # the pseudonyms' key (any 16+ bytes)


def list_column(values: np.ndarray) -> pa.ListArray:
    rows, width = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32)),
                                    pa.array(values.reshape(-1), pa.float32()))


def generate(folder: Path, users: int, versions: int, dim: int) -> int:
    rng = np.random.default_rng(0)
    # Pseudonyms, as the history holds them; sorted, as compaction leaves them
    ids = np.array(sorted(pseudonym(f"person-{u}", KEY) for u in range(users)))
    base = rng.normal(size=(users, dim)).astype(np.float32)
    heading = rng.normal(size=(users, dim)).astype(np.float32)
    speed = rng.exponential(0.02, size=(users, 1)).astype(np.float32)
    features = rng.normal(0.3, 0.1, size=(users, len(FEATURE_NAMES))).astype(np.float32)
    trend = rng.normal(0, 0.002, size=(users, len(FEATURE_NAMES))).astype(np.float32)
    for day in track(range(versions), description="writing history"):
        when = START + timedelta(days=day, hours=3)
        embedding = base + day * speed * heading + rng.normal(0, 0.01, size=(users, dim)).astype(np.float32)
        table = pa.table({
            "user_id": ids, "version": np.full(users, day + 1), "cycle": np.full(users, day + 1),
            "updated_at": pa.array([when] * users, pa.timestamp("us", tz="UTC")),
            "photo_count": np.full(users, 10 + day), "total_weight": np.full(users, 10.0 + day),
            "embedding": list_column(embedding), "features": list_column(features + day * trend),
            "facets": pa.array([[]] * users, STYLE_HISTORY.field("facets").type),
            "tombstone": np.zeros(users, bool)})
        if day < versions - 1:
            history.write_compacted(table, folder, when.date(), day + 1, day + 1)
        else:
            history.write_atomically(table, history.cycle_path(folder, day + 1, when))
    return users * versions


def reused(folder: Path, users: int, versions: int, dim: int) -> int:
    """The rows of a history an earlier run generated, checked against the sizes asked for."""
    with drift.connect(folder) as db:
        [(rows, people, days, width)] = db.sql("SELECT count(*), count(DISTINCT user_id), count(DISTINCT date), "
                                               "max(len(embedding)) FROM history").fetchall()
    if (people, days, width) != (users, versions, dim) or rows != users * versions:
        raise SystemExit(f"{folder} holds {people} users x {days} days ({rows} rows) of {width}-d embeddings, "
                         f"not {users} x {versions} of {dim}-d")
    return rows


def last_day(folder: Path) -> datetime:
    return max(datetime.fromisoformat(p.name.removeprefix("date=")) for p in folder.glob("date=*"))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def pandas_top_n(folder: Path, t0: datetime, t1: datetime, n: int) -> list[str]:
    """The same question as top_drift(t0, t1, n), the pandas way."""
    df = pd.read_parquet(folder, columns=["user_id", "version", "updated_at", "embedding"],
                         filters=[("updated_at", "<=", t1)])
    df["user_id"] = df["user_id"].astype(str)
    last = df.groupby("user_id")["version"].max()
    start = df[df["updated_at"] <= t0].groupby("user_id")["version"].max()
    start = start.reindex(last.index).fillna(df.groupby("user_id")["version"].min()).astype(int)
    changed = last.index[last.to_numpy() > start.to_numpy()]
    emb = df.set_index(["user_id", "version"])["embedding"]
    a = np.stack(emb.loc[list(zip(changed, start[changed], strict=True))].to_numpy())
    b = np.stack(emb.loc[list(zip(changed, last[changed], strict=True))].to_numpy())
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return pd.Series(1 - cos, index=changed).sort_values(ascending=False, kind="stable").index[:n].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--versions", type=int, default=100, help="versions per user (one a day)")
    ap.add_argument("--rows", type=int, help="history rows in all: --versions per user, and as many users as "
                                             "that takes (overrides --users); 100000000 is 1 M users x 100")
    ap.add_argument("--dim", type=int, default=64, help="embedding size (64: the default tiny CLIP; 512: ViT-B-32)")
    ap.add_argument("--window-days", type=int, default=30)
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="keep the generated history here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true",
                    help="time the queries on the history an earlier run left in --dir (same sizes), not a new one")
    ap.add_argument("--pandas", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the pandas baseline (needs tens of GB at 100 M rows)")
    a = ap.parse_args()
    if a.rows is not None:
        if a.rows < a.versions or a.rows % a.versions:
            ap.error(f"--rows must be a multiple of --versions ({a.versions}): one row per user and version")
        a.users = a.rows // a.versions
    folder = (a.dir or Path(tempfile.mkdtemp(prefix="bench-drift-"))) / "history"
    if a.reuse and not a.dir:
        ap.error("--reuse needs --dir")
    t = time.perf_counter()
    rows = reused(folder, a.users, a.versions, a.dim) if a.reuse else generate(folder, a.users, a.versions, a.dim)
    gen_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("date=*/*.parquet"))  # the history, not its snapshots
    print(json.dumps({"bench": "reuse" if a.reuse else "generate", "rows": rows, "seconds": round(gen_s, 1),
                      "bytes": size}), flush=True)
    t = time.perf_counter()
    snapshots = history.compact(folder, before=last_day(folder).date()).snapshots
    snapshots_s = time.perf_counter() - t
    snapshot_bytes = sum(f.stat().st_size for f in (folder / drift.IN_FORCE_DIR).rglob("*.parquet"))
    print(json.dumps({"bench": "snapshots", "days": len(snapshots), "seconds": round(snapshots_s, 1),
                      "bytes": snapshot_bytes}), flush=True)

    t1 = START + timedelta(days=a.versions - 1, hours=3)
    t0 = t1 - timedelta(days=a.window_days)
    db, scan = drift.connect(folder), drift.connect(folder, snapshots=False)
    topn_s, top = timed(lambda: drift.top_drift(db, t0, t1, a.n).column("user_id").to_pylist(), a.repeats)
    scan_s, top_scan = timed(lambda: drift.top_drift(scan, t0, t1, a.n).column("user_id").to_pylist(), a.repeats)
    user = pseudonym(f"person-{a.users // 2}", KEY)
    timeline_s, tl = timed(lambda: drift.timeline(db, user), a.repeats)
    pandas_s, top_pd = timed(lambda: pandas_top_n(folder, t0, t1, a.n), a.repeats) if a.pandas else (None, top)
    print(json.dumps({"bench": "queries", "top": top, "scan_top": top_scan, "pandas_top": top_pd,
                      "timeline_rows": tl.num_rows}), flush=True)
    if not top == top_scan == top_pd:
        raise SystemExit("the queries disagree on the top users")
    print(json.dumps({"bench": "drift", "rows": rows, "users": a.users, "versions": a.versions, "dim": a.dim,
                      "history_mb": round(size / 2**20, 1), "snapshots_mb": round(snapshot_bytes / 2**20, 1),
                      "topn_query_s": round(topn_s, 3), "topn_scan_s": round(scan_s, 3),
                      "ratio_scan_vs_snapshots": round(scan_s / topn_s, 2),
                      "timeline_query_s": round(timeline_s, 3),
                      "pandas_topn_s": round(pandas_s, 3) if pandas_s else None,
                      "ratio_pandas_vs_duckdb": round(pandas_s / topn_s, 2) if pandas_s else None,
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
