"""Ingestion: photo and consent events -> per-user style versions, exactly once.

Local mode is a driver loop of micro-batches. Each cycle plans the new offset ranges of the input
topics, runs one bounded Beam pipeline over them (FnApiRunner), whose last step commits the user
updates together with those offsets in one DuckDB transaction, and then publishes the cycle's
outbox (style vectors, dead letters) and writes its Parquet history file. A crash anywhere repeats
at most the uncommitted cycle, so the final state equals that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms import environments
from kafka import KafkaProducer

from stylestream.analytics import history, pseudonyms
from stylestream.defaults import HALF_LIFE_DAYS, MAX_EVENTS_PER_PARTITION, MIN_HALF_LIFE_DAYS
from stylestream.models.clip import ClipSpec, embedding_dim
from stylestream.pipelines import forgetting
from stylestream.pipelines.layout import StateLayout
from stylestream.pipelines.plan import CycleWrites, plan_cycle
from stylestream.pipelines.store import CycleResult, Store
from stylestream.privacy import erasure
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import StyleBasis
from stylestream.streams import clients
from stylestream.streams.topics import INGEST_COMMITS, INGEST_TOPICS, ensure_topics
from stylestream.transforms.grouping import GroupByUser
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.inputs import StyleInputs
from stylestream.transforms.kafka_read import OffsetRange, ReadOffsetRanges, lend_consumer, plan_ranges
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.records import UserBatch

log = logging.getLogger(__name__)


@dataclass
class IngestConfig:
    bootstrap_servers: str
    state_dir: Path
    clip: ClipSpec
    half_life_days: float = HALF_LIFE_DAYS
    max_events_per_partition: int = MAX_EVENTS_PER_PARTITION
    poll_interval_s: float = 0.1  # with --follow: the wait between looks when caught up
    kafka_timeout_ms: int = 30_000  # a broker silent this long counts as unavailable (then retried)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    # A forget rewrites the whole state file (no erased row may stay in its free blocks), which costs
    # in proportion to everyone's state: with many people, erasures wait up to this long to share one
    # rewrite, and their receipts follow it (bench/scale.py; README, Capacity).
    erasure_batch_s: float = 0.0

    def __post_init__(self):
        if self.erasure_batch_s < 0:
            raise ValueError(f"erasure_batch_s must be 0 or more, got {self.erasure_batch_s}")
        if self.half_life_days < MIN_HALF_LIFE_DAYS:
            raise ValueError(f"half-life must be at least {MIN_HALF_LIFE_DAYS} days, got {self.half_life_days}")
        # Backfilled photos are read from the libraries registered in this state (library:// URIs).
        self.limits = replace(self.limits, libraries=str(StateLayout(self.state_dir).libraries))

    @property
    def basis(self) -> StyleBasis:
        """What every style version is computed from besides the photos (named in its manifest)."""
        return style_basis(self.clip, self.half_life_days, self.limits)

    @property
    def db_path(self) -> Path:
        return StateLayout(self.state_dir).db

    @property
    def history_dir(self) -> Path:
        return StateLayout(self.state_dir).history

    @property
    def plan_path(self) -> Path:
        return StateLayout(self.state_dir).cycle_plan


class TopicReset(RuntimeError):
    """The broker has fewer messages than the state says were processed (a new, empty broker?)."""


def check_not_reset(committed: dict[tuple[str, int], int], ends: dict[tuple[str, int], int]) -> None:
    behind = {k: (o, ends.get(k, 0)) for k, o in committed.items() if o > ends.get(k, 0)}
    if behind:
        where = ", ".join(f"{t}[{p}] state at {o}, broker ends at {e}" for (t, p), (o, e) in sorted(behind.items()))
        raise TopicReset(f"the broker has lost messages this state already processed ({where}); a memory-only "
                         "broker restarted? Use a new --data-dir for a new broker, or point at the original one")


@dataclass(frozen=True)
class CyclePlan:
    """What one cycle reads: its number and the offset ranges it commits. The pipeline graph is built
    once per Ingestor (building it costs more than a small cycle's work) and each run reads its plan
    from this file, written by the driver just before."""

    cycle: int
    ranges: tuple[OffsetRange, ...]

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"cycle": self.cycle, "ranges": [asdict(r) for r in self.ranges]}))

    @staticmethod
    def read(path: str) -> CyclePlan:
        plan = json.loads(Path(path).read_text())
        return CyclePlan(plan["cycle"], tuple(OffsetRange(**r) for r in plan["ranges"]))


# The runner is in this process, so these steps' connections share the Ingestor's open database (the
# one writer: nothing changes the state between the plan and the commit).

class _PlanUserUpdates(beam.DoFn):
    def __init__(self, cfg: IngestConfig, embedding_dim: int):
        self._cfg, self._dim = cfg, embedding_dim

    def setup(self):
        self._key = pseudonyms.load_or_create_key(self._cfg.state_dir)  # for the erasure subjects

    def process(self, gathered: tuple[CyclePlan, list[UserBatch], list[DeadLetter]]):
        plan, batches, dead = gathered
        subjects = {b.user_id: erasure.subject(b.user_id, self._key) for b in batches}
        with Store(self._cfg.db_path, create=False) as store:
            views = store.user_views(batches, self._dim, subjects)
        yield plan, plan_cycle(views, batches, self._cfg.basis, datetime.now(UTC)), dead


class _Commit(beam.DoFn):
    def __init__(self, cfg: IngestConfig):
        self._cfg = cfg

    def setup(self):
        self._key = pseudonyms.load_or_create_key(self._cfg.state_dir)

    def process(self, planned: tuple[CyclePlan, CycleWrites, list[DeadLetter]]):
        plan, writes, dead = planned
        subjects = {e.user_id: erasure.subject(e.user_id, self._key) for e in writes.erasures}
        with Store(self._cfg.db_path, create=False) as store:
            yield store.commit_cycle(plan.cycle, plan.ranges, writes, [*dead, *writes.dead_letters], subjects)


def _gathered(_: str, grouped: dict[str, list]) -> tuple[CyclePlan, list[UserBatch], list[DeadLetter]]:
    (plan,) = grouped["plan"]
    return plan, list(grouped["batches"]), list(grouped["dead"])


class CommitCycle(beam.PTransform):
    """(plan, user batches, dead letters) -> the per-user updates, planned from what the store holds
    (pipelines/plan.py) -> one DuckDB transaction with the plan's offsets -> CycleResult.

    The three meet under one key, with the plan always there, so the commit runs (and records the
    offsets) even for a cycle whose messages produced nothing. Not as side inputs: Beam's worker
    measures the deep size of every side input it caches, which cost more than planning the cycle
    (profiled with bench/ingest.py)."""

    def __init__(self, cfg: IngestConfig, embedding_dim: int):
        super().__init__()
        self._plan, self._commit = _PlanUserUpdates(cfg, embedding_dim), _Commit(cfg)

    def expand(self, pcolls):
        plan, batches, dead = pcolls
        return (
            {
                "plan": plan | "KeyPlan" >> beam.Map(lambda p: ("cycle", p)),
                "batches": batches | "KeyBatches" >> beam.Map(lambda b: ("cycle", b)),
                "dead": dead | "KeyDead" >> beam.Map(lambda d: ("cycle", d)),
            }
            | "Gather" >> beam.CoGroupByKey()
            | "Unpack" >> beam.MapTuple(_gathered)
            | "PlanUserUpdates" >> beam.ParDo(self._plan)
            | "Commit" >> beam.ParDo(self._commit)
        )


def build_cycle(p: beam.Pipeline, cfg: IngestConfig, embedding_dim: int, reader: str | None = None,
                ) -> beam.PCollection:
    """The data flow of one micro-batch (docs/architecture.md); each run reads `cfg.plan_path`, and the
    Kafka read uses the consumer lent as `reader` (`kafka_read.lend_consumer`), if any."""
    plan = p | "Plan" >> beam.Create([str(cfg.plan_path)]) | "ReadPlan" >> beam.Map(CyclePlan.read)
    ranges = plan | "Ranges" >> beam.FlatMap(lambda pl: pl.ranges)
    messages = ranges | "ReadKafka" >> ReadOffsetRanges(cfg.bootstrap_servers, reader)
    inputs = messages | "StyleInputs" >> StyleInputs(cfg.clip, cfg.limits)
    batches = (inputs["contributions"], inputs["deletes"], inputs["toggles"]) | "GroupByUser" >> GroupByUser()
    return (plan, batches, inputs["dead"]) | "CommitCycle" >> CommitCycle(cfg, embedding_dim)


class Ingestor:
    """Runs ingestion cycles against one broker and one state directory."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.embedding_dim = embedding_dim(cfg.clip)
        ensure_topics(cfg.bootstrap_servers)
        # Held for the Ingestor's life: it keeps other writers out, and opening and closing the file
        # three times a cycle cost ~0.1 s.
        self._store = Store(cfg.db_path)
        try:
            self._connect()
        except BaseException:
            self.close()  # what was opened before the failure
            raise
        self._known_ends: dict = {}  # spares re-reading partitions whose end did not move
        self._unfinished = True  # committed cycles may await publishing or their history file
        self._compiled: tuple[FnApiRunner, Any, PipelineOptions] | None = None  # see _run_pipeline

    def _connect(self) -> None:
        cfg = self.cfg
        self._store.check_basis(cfg.basis, self.embedding_dim)
        self._key = pseudonyms.load_or_create_key(cfg.state_dir)  # the history holds pseudonyms only
        # Each cycle's outputs in one Kafka transaction with a "published" marker, under the state's own
        # transactional.id: init_transactions fences an ingestor that ran on a copy of this state.
        # Tansu has no transactions: there the sends are checked, but a crash between sending a
        # cycle and marking it published sends it again.
        self._transactional = not clients.is_tansu(cfg.bootstrap_servers)
        self._transactional_id = self._store.transactional_id()
        self._markers: dict[bytes, bytes] | None = None  # the latest marker per key (read when needed)
        self._lister = clients.consumer(cfg.bootstrap_servers, request_timeout_ms=cfg.kafka_timeout_ms)
        self._consumer = clients.consumer(cfg.bootstrap_servers, request_timeout_ms=cfg.kafka_timeout_ms,
                                          fetch_max_wait_ms=clients.READ_FETCH_WAIT_MS)
        self._producer = self._new_producer()

    def _new_producer(self) -> KafkaProducer:
        # 256 KiB batches: a cycle's outbox goes out at once (a thousand people's versions and manifests
        # went out in half the time they took with the default 16 KiB).
        producer = clients.producer(self.cfg.bootstrap_servers, request_timeout_ms=self.cfg.kafka_timeout_ms,
                                    batch_size=256 * 1024,
                                    transactional_id=self._transactional_id if self._transactional else None)
        if self._transactional:
            try:
                producer.init_transactions()
            except BaseException:
                clients.discard(producer)
                raise
        return producer

    def close(self) -> None:
        for client in (getattr(self, name, None) for name in ("_lister", "_consumer", "_producer")):
            if client is not None:
                client.close()
        self._store.close()

    def __enter__(self) -> Ingestor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_cycle(self) -> CycleResult | None:
        """Process the next offset ranges; None when every partition is caught up."""
        if self._unfinished:  # publishing or history left over from a crash (or a failed finish)
            self._finish_committed()
        committed, cycle = self._store.offsets(), self._store.next_cycle()
        ends = self.end_offsets()
        check_not_reset(committed, ends)
        ranges = plan_ranges(committed, ends, self.cfg.max_events_per_partition)
        if not ranges:
            return None
        self._unfinished = True
        CyclePlan(cycle, tuple(ranges)).write(self.cfg.plan_path)
        self._run_pipeline()
        self._finish_committed()
        result = self._store.cycle_result(cycle)
        unread = sum(end - committed.get(k, 0) for k, end in ends.items())
        return replace(result, lag=unread - sum(len(r) for r in ranges))

    def _run_pipeline(self) -> None:
        """One run of the cycle's pipeline (it reads the plan file). The graph is built and translated
        on the first run only: building it costs more than a small cycle's work, translating it ~70 ms."""
        if self._compiled is None:
            env = environments.EmbeddedPythonEnvironment.default()
            pipeline = beam.Pipeline(runner=FnApiRunner(default_environment=env))
            # The run reads with this Ingestor's consumer: it is in this process, and idle meanwhile.
            build_cycle(pipeline, self.cfg, self.embedding_dim, lend_consumer(self._consumer))
            pipeline.run().wait_until_finish()  # also readies the runner and the options for the next runs
            self._compiled = (pipeline.runner, pipeline.to_runner_api(default_environment=env), pipeline.options)
            return
        runner, proto, options = self._compiled
        runner.run_via_runner_api(proto, options).wait_until_finish()

    def run(self, stop: threading.Event | None = None, follow: bool = False,
            on_cycle: Callable[[CycleResult], None] | None = None,
            on_retry: Callable[[Exception, float], None] | None = None) -> int:
        """Cycles until caught up (or, with `follow`, until `stop` is set); returns how many ran. A
        broker that cannot be reached is retried with exponential backoff instead of failing (any
        broker error, with `follow`; others are raised); a set
        `stop` is honoured between cycles, so the cycle in progress either commits or leaves no trace."""
        stop = stop or threading.Event()
        cycles = 0
        while not stop.is_set():
            # None: caught up, or stopped. Following, even errors that waiting may not fix are retried
            # (and reported); catching up, they end the run.
            result = clients.with_backoff(self.run_cycle, stop, on_retry, retry_all=follow)
            if result is not None:
                cycles += 1
                if follow and cycles == 1:
                    # The model, Beam and the pipeline graph now live as long as the process: keep
                    # them out of full garbage collections, which otherwise stall a cycle ~0.3 s.
                    gc.freeze()
                if on_cycle:
                    on_cycle(result)
            elif not follow:
                # Caught up: erasures waiting for the batched rewrite are done before the run ends.
                if self._store.rewrite_due(0.0):
                    clients.with_backoff(lambda: self._finish_committed(batch_s=0.0), stop, on_retry)
                break
            else:
                if self._store.rewrite_due(self.cfg.erasure_batch_s):  # erasures waiting may come of age idle
                    clients.with_backoff(self._finish_committed, stop, on_retry, retry_all=True)
                stop.wait(self.cfg.poll_interval_s)
        return cycles

    def run_until_caught_up(self, on_cycle: Callable[[CycleResult], None] | None = None) -> list[CycleResult]:
        done: list[CycleResult] = []

        def record(result: CycleResult) -> None:
            done.append(result)
            if on_cycle:
                on_cycle(result)
        self.run(on_cycle=record)
        return done

    def end_offsets(self) -> dict[tuple[str, int], int]:
        tps = [tp for t in INGEST_TOPICS for tp in clients.partitions_of(self._lister, t)]
        ends = clients.true_end_offsets(self._lister, tps, known=self._known_ends, reader=self._consumer)
        return {(tp.topic, tp.partition): end for tp, end in ends.items()}

    def _finish_committed(self, batch_s: float | None = None) -> None:
        """What follows the committed cycles; `batch_s`: how old the oldest erasure must be for the
        state file's rewrite (default: the configured `erasure_batch_s`)."""
        for cycle in self._store.unpublished_cycles():
            self._publish(cycle)
        batch_s = self.cfg.erasure_batch_s if batch_s is None else batch_s
        self._store = store = finish_beside_state(self._store, StateLayout(self.cfg.state_dir), self._key, batch_s)
        # The receipts: signed once everything they count is done, the rewrite included.
        if store.compaction_due() is None:
            forgetting.sign_and_publish(store.receipts,
                                        lambda: erasure.load_or_create_signing_key(self.cfg.state_dir),
                                        lambda receipts: self._send_once("receipts", receipts))
        self._unfinished = False

    def _publish(self, cycle: int) -> None:
        """The cycle's outbox out, all or none, then marked published here."""
        self._send_once("cycle", self._store.outbox(cycle))
        self._store.mark_published(cycle)

    def _send_once(self, kind: str, messages: list[tuple[str, bytes | None, bytes | None]]) -> None:
        """`messages` out, all or none. On Kafka they go in one transaction with a marker (this state's
        transactional id and `kind`, their digest) on ingest-commits: when a crash came after the
        commit and before the state recorded it, the marker is found and nothing is sent twice. The
        digest, not a cycle number, says "these very messages": a restored or copied state that
        numbers its cycles anew never skips one."""
        parts = (p for topic, key, value in messages for p in (topic.encode(), key or b"", value or b""))
        digest = hashlib.sha256(b"".join(len(p).to_bytes(8, "big") + p for p in parts)).hexdigest().encode()
        marker = f"{self._transactional_id}/{kind}".encode()
        if self._transactional and self._latest_markers().get(marker) == digest:
            return
        if self._producer is None:
            self._producer = self._new_producer()
        try:
            with clients.sending(self._producer, self._transactional, self.cfg.kafka_timeout_ms / 1000) as send:
                for topic, key, value in messages:
                    send(topic, key, value)
                if self._transactional:
                    send(INGEST_COMMITS, marker, digest)
        except BaseException:
            # A failed send or transaction: a new producer for the next try (kafka-python's keeps the
            # failed transaction's sequence numbers; the new one's init_transactions aborts what is
            # open), and the markers read again (a commit whose answer was lost may have landed).
            with contextlib.suppress(Exception):
                clients.discard(self._producer)
            self._producer, self._markers = None, None
            raise
        if self._transactional:
            self._latest_markers()[marker] = digest

    def _latest_markers(self) -> dict[bytes, bytes]:
        """This state's latest marker per key, read committed, once until a send fails: in between this
        ingestor is the only writer of its markers (another would have fenced it)."""
        if self._markers is None:
            mine = f"{self._transactional_id}/".encode()
            self._markers = {m.key: m.value for m in clients.read_all(self.cfg.bootstrap_servers, INGEST_COMMITS)
                             if m.key and m.key.startswith(mine) and m.value}
        return self._markers


def connect(cfg: IngestConfig, stop: threading.Event, on_retry: Callable[[Exception, float], None] | None = None,
            retry_all: bool = False) -> Ingestor | None:
    """An Ingestor once the broker answers (`clients.with_backoff`); None if `stop` was set first."""
    return clients.with_backoff(lambda: Ingestor(cfg), stop, on_retry, retry_all)


def finish_beside_state(store: Store, layout: StateLayout, key: bytes, erasure_batch_s: float = 0.0) -> Store:
    """What follows the commits besides publishing: their history files, the redactions of withdrawn
    versions there, what of a forgotten person lies beside the state, then the state file rewritten
    if an erasure asked for it at least `erasure_batch_s` ago (returns the store, reopened if so)."""
    for cycle in store.unwritten_history():
        write_history_file(layout.history, cycle, store, key)
        store.mark_history_written(cycle)
    if redactions := store.pending_redactions():
        history.redact(layout.history, [(pseudonyms.pseudonym(u, key), a, b) for _, u, a, b in redactions])
        store.mark_redacted(sorted({c for c, _, _, _ in redactions}))
    forgetting.erase_pending(store.receipts, layout, key)
    return store.rewrite() if store.rewrite_due(erasure_batch_s) else store


def write_history_file(history_dir: Path, cycle: int, store: Store, key: bytes) -> Path | None:
    """The cycle's file in the history (see analytics.history), with the versions it committed under
    pseudonymous user ids; none if it changed no style."""
    table = store.history_rows(cycle)
    if table.num_rows == 0:
        return None
    path = history.cycle_path(history_dir, cycle, store.committed_at(cycle))
    # Sorted by pseudonym, as compaction sorts: a query for one user skips most row groups.
    table = pseudonyms.pseudonymize(table, key).sort_by([("user_id", "ascending"), ("version", "ascending")])
    history.write_atomically(table, path)
    return path
