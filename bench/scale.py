#!/usr/bin/env python
"""How the local driver's state costs grow with the number of people and photos.

For each size (people), in a process of its own (so peak memory is that size's):
  1. grow    a state to SIZE people with PHOTOS uploads each through the store's own write path:
             real plans (`plan_cycle`) committed by `Store.commit_cycle` a thousand people a cycle,
             then published and written to the history as the driver does after a commit.
             Contributions are precomputed (random unit embeddings of the bundled model's size,
             random features): this measures the state, not the model (bench/decode_embed.py does).
             Steps 2-4 run on a copy of it.
  2. resume  the state closed and opened again as a restarted driver opens it (the file, its basis,
             its offsets, its next cycle).
  3. events  the same fixed batch of real events against it, each event a cycle of its own (views,
             plan, commit, history, redactions: the per-event update time), then the whole batch again
             as one cycle (the cycle time): new uploads, deletions, album and photo opt-outs, a forget.
  4. forget  the state-file rewrite that forget triggers (no erased row may stay in the file): it
             copies everyone's state, so it is reported on its own, not in the times above, and
             `ingest --erasure-batch-s` lets erasures share one.

Kafka and Beam are left out (bench/ingest.py measures them): the offsets the cycles commit are of a
topic of the bench's own. Final line: one JSON object with a `sizes` map (people -> figures) and
`growth_1k_to_1m` (per-event p50 at the largest size / at the smallest, where both ran).

On a 2-core machine growing takes about 3 minutes at 10 k people and 20 at 100 k; 1 M people with 20
photos each takes hours (2 h 25 min), and measuring all four grown sizes about 20 minutes.
Disk (--dir chooses where): three times the grown state (itself, the copy measured on, and the
forget's rewrite of that copy), about 45 GB at 1 M people. A growth that was stopped goes on in the
next run with the same --dir (`grow_runs` counts the runs that grew it). A state grown or measured by
a run with --keep stays there, and later runs with that --dir measure on it without growing it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from tqdm import tqdm

from stylestream.analytics import pseudonyms
from stylestream.defaults import HALF_LIFE_DAYS
from stylestream.demo.synthetic import toggle_event
from stylestream.models.clip import ClipSpec, embedding_dim
from stylestream.pipelines.ingest import finish_beside_state
from stylestream.pipelines.layout import StateLayout
from stylestream.pipelines.plan import plan_cycle
from stylestream.pipelines.store import Store
from stylestream.privacy import erasure
from stylestream.schemas.events import ImageRef, PhotoDeleted, PhotoUploaded, UserForgotten
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.kafka_read import OffsetRange
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.pixels import DecodeLimits
from stylestream.transforms.records import Contribution, Sourced, UserBatch

TOPIC = "bench-scale"  # the offsets the bench's cycles commit (no broker is involved)
PEOPLE_PER_CYCLE = 1000
DEFAULT_PHOTOS = {1_000: 100, 10_000: 50, 100_000: 30, 1_000_000: 20}  # per person, by size
T0 = datetime(2024, 1, 1, tzinfo=UTC)
ALBUMS = 4
GROWING = "growing.json"  # in a grown state: seconds spent growing it, in how many runs, and if complete


def person(i: int) -> str:
    return f"u{i:07d}"


def upload(user: str, j: int, dim: int, rng: np.random.Generator) -> Contribution:
    """Photo `j` of `user`, as the embedding step hands it on."""
    e = rng.standard_normal(dim).astype(np.float32)
    sha = hashlib.sha256(f"{user}/{j}".encode()).hexdigest()
    event = PhotoUploaded(event_id=f"up-{user}-{j}", user_id=user, event_time=T0, photo_id=f"{user}-p{j}",
                          album_id=f"a{j % ALBUMS}", taken_at=T0 - timedelta(days=j),
                          image=ImageRef(uri=f"s3://photos/{user}/{j}.jpg", sha256=sha, size_bytes=1))
    return Contribution(event, e / np.linalg.norm(e), rng.random(len(FEATURE_NAMES)).astype(np.float32), {}, sha)


class Driver:
    """The local driver's cycle around the store, less Kafka and Beam: views, plan, commit, the outbox
    marked published (not sent), then what follows a commit beside the state (`finish_beside_state`)."""

    def __init__(self, state_dir: Path):
        self.layout = StateLayout(state_dir)
        self.clip = ClipSpec()
        self.dim = embedding_dim(self.clip)
        self.basis = style_basis(self.clip, HALF_LIFE_DAYS, DecodeLimits())
        self.key = pseudonyms.load_or_create_key(state_dir)
        self.store = self.open()

    def open(self) -> Store:
        store = Store(self.layout.db)
        store.check_basis(self.basis, self.dim)
        return store

    def cycle(self, batches: list[UserBatch], events: int) -> float | None:
        """One cycle; returns how long the state-file rewrite took, if the cycle asked for one."""
        store = self.store
        cycle, start = store.next_cycle(), store.offsets().get((TOPIC, 0), 0)
        subjects = {b.user_id: erasure.subject(b.user_id, self.key) for b in batches}
        views = store.user_views(batches, self.dim, subjects)
        writes = plan_cycle(views, batches, self.basis, datetime.now(UTC))
        store.commit_cycle(cycle, [OffsetRange(TOPIC, 0, start, start + events)], writes, [], subjects)
        store.mark_published(cycle)
        store = finish_beside_state(store, self.layout, self.key, erasure_batch_s=math.inf)  # all but the rewrite
        if not store.rewrite_due(0):
            return None
        t = time.perf_counter()
        self.store = store.rewrite()
        return time.perf_counter() - t


def grow(grown: Path, people: int, photos: int, keep: bool = False) -> dict:
    """Grows the state in `grown` to `people`, a cycle per PEOPLE_PER_CYCLE of them, going on from
    where an earlier run stopped (each cycle commits its people at once, so the state's next cycle
    says how many there are). Returns its progress: seconds spent growing in all runs, the runs that
    grew it, and whether a run asked to keep it."""
    progress_file = grown / GROWING
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"grow_s": 0.0, "runs": 0}
    progress["keep"] = progress.get("keep", False) or keep
    if progress.get("complete"):
        save_progress(progress_file, progress)
        return progress
    driver = Driver(grown)
    for cycle in driver.store.unpublished_cycles():  # stopped between a commit and its publishing
        driver.store.mark_published(cycle)
    progress["runs"] += 1
    start = (driver.store.next_cycle() - 1) * PEOPLE_PER_CYCLE
    for first in tqdm(range(start, people, PEOPLE_PER_CYCLE), desc=f"grow {people:,} people", unit="cycle",
                      initial=start // PEOPLE_PER_CYCLE, total=math.ceil(people / PEOPLE_PER_CYCLE), file=sys.stderr):
        t = time.perf_counter()
        rng = np.random.default_rng([people, first])
        batches = [UserBatch(person(i), [upload(person(i), j, driver.dim, rng) for j in range(photos)])
                   for i in range(first, min(first + PEOPLE_PER_CYCLE, people))]
        driver.cycle(batches, sum(len(b.contributions) for b in batches))
        progress["grow_s"] += time.perf_counter() - t
        save_progress(progress_file, progress)
    driver.store.close()
    progress["complete"] = True
    save_progress(progress_file, progress)
    return progress


def save_progress(path: Path, progress: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, path)  # whole or not at all: a run stopped while writing it leaves the last one


def fixed_batch(people: int, photos: int, dim: int) -> list[UserBatch]:
    """The same 181 events at every size, each as its user's batch: 100 new uploads, 40 deletions,
    20 album and 20 photo opt-outs, one forget, of people spread over the population."""
    rng = np.random.default_rng(7)
    who = lambda k: person(int(k) * people // 200)  # noqa: E731 (200 people spread evenly)
    src = lambda e: Sourced(e, TOPIC, 0, 0, b"")  # noqa: E731
    at = T0 + timedelta(days=1)
    out = [UserBatch.of(upload(who(k), photos + k, dim, rng)) for k in range(100)]
    out += [UserBatch.of(src(PhotoDeleted(event_id=f"del-{k}", user_id=who(100 + k), event_time=at,
                                          photo_id=f"{who(100 + k)}-p{k % photos}"))) for k in range(40)]
    out += [UserBatch.of(src(toggle_event(who(140 + k), "album", f"a{k % ALBUMS}", False, at))) for k in range(20)]
    out += [UserBatch.of(src(toggle_event(who(160 + k), "photo", f"{who(160 + k)}-p{k % photos}", False, at)))
            for k in range(20)]
    out.append(UserBatch.of(src(UserForgotten(event_id="forget-1", user_id=who(199), event_time=at))))
    return out


def one_size(people: int, photos: int, root: Path, keep: bool) -> dict:
    """Steps 1-4 for one size, in this process; returns its figures."""
    state = root / f"state-{people}"
    grown = root / f"grown-{people}x{photos}"  # the grown state, as step 1 left it
    shutil.rmtree(state, ignore_errors=True)
    # 1. Grow (or go on growing, or take what an earlier run grew and kept), then measure on a copy
    growth = grow(grown, people, photos, keep)
    shutil.copytree(grown, state)
    (state / GROWING).unlink()
    driver = Driver(state)
    state_bytes = driver.layout.db.stat().st_size
    # 2. Resume
    driver.store.close()
    t = time.perf_counter()
    driver.store = driver.open()
    driver.store.offsets(), driver.store.next_cycle()
    resume_s = time.perf_counter() - t
    # 3. The fixed batch, each event a cycle (4. the forget's rewrite among them), then all of it in
    #    one cycle on the grown state again
    batch = fixed_batch(people, photos, driver.dim)
    times, forget_rewrite_s = [], None
    for b in tqdm(batch, desc="events", unit="event", file=sys.stderr):
        t = time.perf_counter()
        rewrite_s = driver.cycle([b], 1)
        times.append(time.perf_counter() - t - (rewrite_s or 0.0))  # the rewrite is reported on its own
        forget_rewrite_s = rewrite_s if rewrite_s is not None else forget_rewrite_s
    driver.store.close()
    shutil.copy(grown / driver.layout.db.relative_to(state), driver.layout.db)
    driver.store = driver.open()
    by_user: dict[str, UserBatch] = {}
    for b in batch:
        merged = by_user.setdefault(b.user_id, UserBatch(b.user_id))
        for name in ("contributions", "deletes", "toggles", "forgets"):
            getattr(merged, name).extend(getattr(b, name))
    t = time.perf_counter()
    rewrite_s = driver.cycle(list(by_user.values()), len(batch))
    cycle_s = time.perf_counter() - t - (rewrite_s or 0.0)
    driver.store.close()
    shutil.rmtree(state, ignore_errors=True)
    if not growth["keep"]:
        shutil.rmtree(grown, ignore_errors=True)
    return {"people": people, "photos_per_person": photos, "grow_s": round(growth["grow_s"], 1),
            "grow_runs": growth["runs"],
            "update_p50_s": round(float(np.percentile(times, 50)), 4),
            "update_p99_s": round(float(np.percentile(times, 99)), 4),
            "cycle_s": round(cycle_s, 3), "events_per_cycle": len(batch),
            "state_bytes": state_bytes, "state_bytes_per_person": round(state_bytes / people),
            "state_bytes_per_photo": round(state_bytes / (people * photos)),
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "resume_s": round(resume_s, 3),
            "forget_rewrite_s": None if forget_rewrite_s is None else round(forget_rewrite_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000,1000000",
                    help="people, comma-separated (default: %(default)s)")
    ap.add_argument("--photos", type=int, default=None,
                    help="photos per person at every size (default: 100 at 1 k, 50 at 10 k, 30 at 100 k, 20 at 1 M)")
    ap.add_argument("--dir", type=Path, default=None, help="where the states are grown (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true",
                    help="keep each grown state in --dir (from then on, whatever later runs ask), for later "
                         "runs with that --dir to measure on without growing it again (the 1 M growth takes hours)")
    ap.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.keep and args.dir is None:
        ap.error("--keep needs --dir: where the grown states stay")
    root = args.dir or Path(tempfile.mkdtemp(prefix="stylestream-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.one_size is not None:
        print(json.dumps(one_size(args.one_size, args.photos, root, args.keep)))
        return
    sizes = {}
    for people in (int(s) for s in args.sizes.split(",")):
        photos = args.photos or DEFAULT_PHOTOS.get(people, 20)
        child = subprocess.run([sys.executable, __file__, "--one-size", str(people), "--photos", str(photos),
                                "--dir", str(root), *(["--keep"] if args.keep else [])],
                               stdout=subprocess.PIPE, text=True, check=True)
        sizes[people] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{people:>9,} people: {json.dumps(sizes[people])}", file=sys.stderr, flush=True)
    small, large = min(sizes), max(sizes)
    growth = sizes[large]["update_p50_s"] / sizes[small]["update_p50_s"] if large != small else None
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"sizes": sizes, "growth_1k_to_1m": None if growth is None else round(growth, 2),
                      "growth_between": [small, large]}))


if __name__ == "__main__":
    main()
