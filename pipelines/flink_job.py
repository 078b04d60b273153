"""The streaming pipeline's steps as a job on Apache Flink (PyFlink), with Flink's checkpoints.

    python -m stylestream.pipelines.flink_job --bootstrap-servers HOST:PORT --data-dir DIR [--restore latest]

Run with the Flink environment's Python (`make flink`; `pipelines/flink_setup.py`): PyFlink pins an
older Beam than the project's. Beam's own FlinkRunner would run `pipelines/streaming.py` unchanged, but
its job server is not served by the Maven Central these machines reach (infra/README.md); this job is
the same steps written against Flink's API instead:

  Kafka (Flink's connector: photo-events, consent-events and the job's own style-vectors, with
        topic/partition/offset, read_committed)
    -> style_input (transforms/inputs.py: parse, fetch, decode, strip, embed; or a dead letter)
    -> keyed by the user's erasure subject: apply_batch / publish_latest (pipelines/user_state.py) over
       Flink keyed state (a value for the summary, map states for the photos and the album index),
       publish timer in processing time; forget requests clear the person's state
    -> Kafka (style-vectors, style-manifests, photo-events for re-ingestion, dead-letter topics), in
       Kafka transactions committed with each checkpoint: exactly once across a crash and a restore.

Downtime: the Kafka transaction timeout is the broker's maximum (`transaction.max.timeout.ms`, 15 min
by default). The state remembers what the job published until it reads it back, committed: whatever
is not read back within --confirm-after-s is published again, byte for byte: versions and tombstones
(read back from style-vectors) and re-published uploads (read back from photo-events); dead letters
are not kept (their originals stay on the input topics). A change waiting for its publish timer when
a checkpoint is taken is in that checkpoint with its timer: a job killed the instant after restores
from it and publishes the change.

Checkpoints go to DIR/checkpoints (or --checkpoint-dir) and are kept when the job stops (the newest
--retained-checkpoints); `--restore latest` starts from the newest complete one (sources' offsets,
users' state and pending timers). The Parquet history and a forgotten person's data beside the
state are the history writer's (`stylestream history follow`, pipelines/history_writer.py).
Metrics (events, dead letters, versions published, republished, erasures, state bytes; the Kafka
source's lag) go to Flink's metric system and, with --metrics-port, to a Prometheus endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import signal
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from pyflink.common import Configuration, Row, Types
from pyflink.datastream import (
    FlatMapFunction,
    KeyedProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

from stylestream.models.clip import embedding_dim
from stylestream.pipelines.flink_setup import connector_jars
from stylestream.pipelines.settings import IngestSettings, SettingsError, add_arguments, from_arguments
from stylestream.pipelines.user_state import (
    PUBLISH_DELAY_S,
    PhotoEntry,
    UserSummary,
    album_index_changes,
    apply_batch,
    changed_entries,
    publish_latest,
)
from stylestream.privacy.erasure import subject
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import InvalidEvent, StyleBasis, parse_event, to_message
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.clients import Message, compression
from stylestream.streams.topics import (
    INGEST_TOPICS,
    MAX_MESSAGE_BYTES,
    PHOTO_EVENTS,
    STYLE_MANIFESTS,
    STYLE_VECTORS,
    broker_config,
    dlq,
    ensure_topics,
)
from stylestream.transforms.device import DeviceChecks
from stylestream.transforms.embed import OpenClipImageHandler, photo_image
from stylestream.transforms.inputs import style_input
from stylestream.transforms.records import Contribution, UserBatch

OUTGOING = Types.ROW_NAMED(["topic", "key", "value"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()),
                                                       Types.PRIMITIVE_ARRAY(Types.BYTE())])
# `topic` picks one per row
OUTGOING_TOPICS = [STYLE_VECTORS, STYLE_MANIFESTS, PHOTO_EVENTS, *(dlq(t) for t in INGEST_TOPICS)]
INCOMING_TOPICS = [*INGEST_TOPICS, STYLE_VECTORS]  # style-vectors: what the job published, read back committed
# (kind, subject, pickled value): "update" (a UserBatch) and "confirm" (an event id read back on
# style-vectors) go to the user's state, "dead" (a DeadLetter) out
KEYED = Types.TUPLE([Types.STRING(), Types.STRING(), Types.PICKLED_BYTE_ARRAY()])
MAX_TRANSACTION_TIMEOUT_MS = 900_000  # Kafka's default transaction.max.timeout.ms


class MapStateCells:
    """One user's cells in Flink keyed state (`pipelines/user_state.UserCells`)."""

    def __init__(self, summary, photos, albums):
        self._summary, self._photos, self._albums = summary, photos, albums
        self.read = self.written = 0

    def _load(self, raw: bytes | None):
        self.read += len(raw or b"")
        return pickle.loads(raw) if raw else None

    def _dump(self, value) -> bytes:
        raw = pickle.dumps(value)
        self.written += len(raw)
        return raw

    def summary(self, empty: UserSummary) -> UserSummary:
        return self._load(self._summary.value()) or empty

    def write_summary(self, summary: UserSummary) -> None:
        self._summary.update(self._dump(summary))

    def entries(self, photo_ids: Iterable[str]) -> dict[str, PhotoEntry]:
        found = {p: self._load(self._photos.get(p)) for p in set(photo_ids)}
        return {p: e for p, e in found.items() if e is not None}

    def album_photos(self, album_id: str) -> set[str]:
        return set(self._load(self._albums.get(album_id)) or ())

    def every_entry(self) -> dict[str, PhotoEntry]:
        return {p: self._load(raw) for p, raw in self._photos.items()}

    def write_entries(self, before: dict[str, PhotoEntry], after: dict[str, PhotoEntry]) -> None:
        """Rewrites the entries that changed, and the id lists of albums whose photos changed."""
        for p, raw in changed_entries(before, after).items():
            self.written += len(raw)
            self._photos.put(p, raw)
        gained, lost = album_index_changes(before, after)
        albums = {album_id: self.album_photos(album_id) for album_id in {a for a, _ in gained + lost}}
        for album_id, p in gained:
            albums[album_id].add(p)
        for album_id, p in lost:
            albums[album_id].discard(p)
        for album_id, ids in albums.items():
            self._albums.put(album_id, self._dump(sorted(ids)))

    def clear(self) -> None:
        self._summary.clear()
        self._photos.clear()
        self._albums.clear()


class StyleInputs(FlatMapFunction):
    """Kafka rows -> (subject, UserBatch) to update, (subject, event id) read back, or dead letters."""

    def __init__(self, settings: IngestSettings):
        self._settings = settings  # its model resolved on the submitting machine (`clip` is cached)

    def open(self, runtime_context: RuntimeContext):
        self._limits = self._settings.limits
        handler = OpenClipImageHandler(self._settings.clip, image_of=photo_image)
        model = handler.load_model()
        self._embed = lambda photo: handler.run_inference([photo], model)[0].inference
        self._device = DeviceChecks(self._settings.clip, self._limits)
        self._key = self._settings.analytics_key()  # a file on every worker (a Secret), never made here
        metrics = runtime_context.get_metrics_group().add_group("stylestream")
        self._events, self._dead = metrics.counter("events"), metrics.counter("dead_letters")

    def flat_map(self, row):
        key, value, topic, partition, offset, ts = row
        msg = Message(topic, partition, offset, bytes(key) if key is not None else None,
                      bytes(value) if value is not None else None, ts.to_epoch_milli() if ts is not None else 0)
        if topic == STYLE_VECTORS:
            yield from self._read_back(msg)
            return
        self._events.inc()
        out = style_input(msg, self._limits, self._embed, self._device)
        if isinstance(out, DeadLetter):
            self._dead.inc()
            yield "dead", "", pickle.dumps(out)
            if msg.topic == PHOTO_EVENTS and msg.key:  # a re-published upload read back, though unusable
                with contextlib.suppress(ValueError, AttributeError):
                    event_id = json.loads(msg.value)["event_id"]
                    yield "confirm", subject(msg.key.decode(), self._key), pickle.dumps(event_id)
        else:
            user_id = out.user_id if isinstance(out, Contribution) else out.event.user_id
            yield "update", subject(user_id, self._key), pickle.dumps(UserBatch.of(out))

    def _read_back(self, msg: Message):
        if msg.value is None:
            return
        try:
            v = parse_event(STYLE_VECTORS, msg.value)
        except InvalidEvent:
            return
        yield "confirm", subject(v.user_id, self._key), pickle.dumps(v.event_id)


def dead_letter_row(keyed) -> Row:
    d: DeadLetter = pickle.loads(keyed[2])
    return Row(*d.message())


class UpdateUserStyle(KeyedProcessFunction):
    """Each user's style state in Flink keyed state; emits outgoing rows, and keeps what it published
    until it reads it back committed (`unconfirmed`: [(event id, published at ms, messages)])."""

    def __init__(self, dim: int, n_features: int, basis: StyleBasis, publish_delay_s: float, confirm_after_s: float):
        self._dim, self._n_features = dim, n_features
        self._basis, self._delay_ms = basis, int(publish_delay_s * 1000)
        self._confirm_ms = int(confirm_after_s * 1000)

    def open(self, ctx: RuntimeContext):
        raw = Types.PICKLED_BYTE_ARRAY()
        self._summary = ctx.get_state(ValueStateDescriptor("summary", raw))
        self._photos = ctx.get_map_state(MapStateDescriptor("photos", Types.STRING(), raw))
        self._albums = ctx.get_map_state(MapStateDescriptor("albums", Types.STRING(), raw))
        self._unconfirmed = ctx.get_state(ValueStateDescriptor("unconfirmed", raw))
        metrics = ctx.get_metrics_group().add_group("stylestream")
        self._published = metrics.counter("versions_published")
        self._republished = metrics.counter("republished")
        self._erasures = metrics.counter("erasures")
        self._refused = metrics.counter("dead_letters")  # contributions the state refused
        self._bytes_read = metrics.counter("state_bytes_read")
        self._bytes_written = metrics.counter("state_bytes_written")

    def _cells(self) -> MapStateCells:
        return MapStateCells(self._summary, self._photos, self._albums)

    def _empty(self) -> UserSummary:
        return UserSummary.empty(self._dim, self._n_features)

    def _count(self, cells: MapStateCells) -> None:
        self._bytes_read.inc(cells.read)
        self._bytes_written.inc(cells.written)

    def _timer_after(self, ctx, delay_ms: int) -> None:
        # On the next multiple of the publish delay after it: Flink keeps one timer per key and time,
        # so a burst registers one, and a change after a restore registers one whatever the restored
        # state says is pending.
        ts = ctx.timer_service()
        due = ts.current_processing_time() + delay_ms
        ts.register_processing_time_timer(-(-due // self._delay_ms) * self._delay_ms)

    def _publish(self, ctx, event_id: str, messages: list) -> Iterable[Row]:
        """Messages out, remembered until read back."""
        pending = pickle.loads(self._unconfirmed.value() or pickle.dumps([]))
        pending.append((event_id, ctx.timer_service().current_processing_time(), messages))
        self._unconfirmed.update(pickle.dumps(pending))
        self._timer_after(ctx, self._confirm_ms)
        for message in messages:
            yield Row(*message)

    def _confirm(self, event_id: str) -> None:
        """Read back committed: it is out, and so is what was published before it to the same topic (a
        user's messages keep their order on their partition)."""
        pending = pickle.loads(self._unconfirmed.value() or pickle.dumps([]))
        match = next((i for i, (e, _, _) in enumerate(pending) if e == event_id), None)
        if match is None:
            return
        topic = pending[match][2][0][0]
        rest = [p for i, p in enumerate(pending) if i > match or p[2][0][0] != topic]
        if rest:
            self._unconfirmed.update(pickle.dumps(rest))
        else:
            self._unconfirmed.clear()

    def process_element(self, keyed, ctx: KeyedProcessFunction.Context):
        kind, _, value = keyed
        if kind == "confirm":
            self._confirm(pickle.loads(value))
            return
        batch = pickle.loads(value)
        for c in batch.contributions:  # an upload read back: a re-published one is out
            self._confirm(c.upload.event_id)
        cells = self._cells()
        applied = apply_batch(cells, batch, self._empty(), self._basis, datetime.now(UTC))
        self._count(cells)
        if applied.erased:
            self._erasures.inc()
            yield from self._publish(ctx, parse_event(STYLE_VECTORS, applied.erased[0][2]).event_id, applied.erased)
        if applied.changed:
            self._timer_after(ctx, self._delay_ms)
        for upload in applied.reingest:  # kept until read back, like versions
            yield from self._publish(ctx, upload.event_id, [(PHOTO_EVENTS, *to_message(upload))])
        for letter in applied.dead_letters:  # contributions refused: out with the checkpoint, like StyleInputs'
            self._refused.inc()
            yield Row(*letter.message())

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        # 1. The latest version, if a change waits.
        cells = self._cells()
        version = publish_latest(cells, self._empty(), self._basis, datetime.now(UTC))
        self._count(cells)
        if version is not None:
            self._published.inc()
            yield from self._publish(ctx, version.event.event_id, version.messages())
        # 2. What was published long ago and never read back (its transaction aborted while the job was
        #    down), again, byte for byte.
        pending = pickle.loads(self._unconfirmed.value() or pickle.dumps([]))
        now = ctx.timer_service().current_processing_time()
        if pending and now - pending[0][1] >= self._confirm_ms:
            self._republished.inc(len(pending))
            self._unconfirmed.update(pickle.dumps([(e, now, m) for e, _, m in pending]))
            for _, _, messages in pending:
                for message in messages:
                    yield Row(*message)
        if pending:
            self._timer_after(ctx, self._confirm_ms)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints` (Flink's <job id>/chk-<n>/_metadata)."""
    done = [m.parent for m in checkpoints.glob("*/chk-*/_metadata")]
    return max(done, key=lambda d: (d.stat().st_mtime, int(d.name.split("-")[1])), default=None)


def transaction_timeout_ms(bootstrap_servers: str, wanted_s: int | None) -> int:
    """The broker's maximum (how long a job may be down before its open transaction is aborted), or
    less if asked."""
    broker_max = int(broker_config(bootstrap_servers).get("transaction.max.timeout.ms", MAX_TRANSACTION_TIMEOUT_MS))
    return broker_max if wanted_s is None else min(broker_max, wanted_s * 1000)


def build_job(args, settings: IngestSettings, jars: list[Path]) -> StreamExecutionEnvironment:
    conf = Configuration()
    if jars:  # else Flink's own lib/ must hold the connector (a cluster image)
        conf.set_string("pipeline.jars", ";".join(p.resolve().as_uri() for p in jars))
    conf.set_string("python.executable", sys.executable)
    conf.set_string("python.execution-mode", "process")
    conf.set_string("execution.checkpointing.interval", f"{args.checkpointing_interval_ms} ms")
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", args.checkpoint_dir)
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    # Older checkpoints are deleted: a forgotten person's state lives on in at most this many.
    conf.set_string("execution.checkpointing.num-retained", str(args.retained_checkpoints))
    conf.set_string("state.backend.type", "rocksdb")
    conf.set_string("state.backend.rocksdb.metrics.total-sst-files-size", "true")
    if args.metrics_port:
        conf.set_string("metrics.reporter.prom.factory.class",
                        "org.apache.flink.metrics.prometheus.PrometheusReporterFactory")
        conf.set_string("metrics.reporter.prom.port", str(args.metrics_port))
    if args.restore:
        local = Path(args.checkpoint_dir.removeprefix("file://"))
        path = latest_checkpoint(local) if args.restore == "latest" else Path(args.restore)
        if path is not None:
            print(f"restoring from {path}", file=sys.stderr, flush=True)
            conf.set_string("execution.state-recovery.path", path.resolve().as_uri())
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(settings.parallelism)
    t_env = StreamTableEnvironment.create(env)
    kafka = (f"'connector' = 'kafka', 'properties.bootstrap.servers' = '{args.bootstrap_servers}', "
             "'key.format' = 'raw', 'value.format' = 'raw', 'key.fields' = 'key', "
             "'value.fields-include' = 'EXCEPT_KEY'")
    t_env.execute_sql(f"""
        CREATE TABLE incoming (
          `key` BYTES, `value` BYTES, `topic` STRING METADATA VIRTUAL, `partition` INT METADATA VIRTUAL,
          `offset` BIGINT METADATA VIRTUAL, `ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL
        ) WITH ({kafka}, 'topic' = '{";".join(INCOMING_TOPICS)}', 'scan.startup.mode' = 'earliest-offset',
                'properties.group.id' = 'stylestream-flink', 'properties.isolation.level' = 'read_committed')""")
    # Outgoing messages in Kafka transactions, committed with each checkpoint. After a crash, readers
    # (read_committed) wait for the killed job's open transaction until it times out.
    t_env.execute_sql(f"""
        CREATE TABLE outgoing (`topic` STRING METADATA, `key` BYTES, `value` BYTES)
        WITH ({kafka}, 'topic' = '{";".join(OUTGOING_TOPICS)}', 'sink.delivery-guarantee' = 'exactly-once',
              'sink.transactional-id-prefix' = 'stylestream-flink',
              'properties.max.request.size' = '{MAX_MESSAGE_BYTES}',
              'properties.compression.type' = '{compression() or "none"}',
              'properties.transaction.timeout.ms' = '{args.transaction_timeout_ms}')""")

    clip = settings.clip  # resolved here, before the settings travel to the workers
    confirm_after_s = args.confirm_after_s or max(10.0, 5 * args.checkpointing_interval_ms / 1000)
    inputs = (t_env.to_data_stream(t_env.from_path("incoming"))
              .flat_map(StyleInputs(settings), output_type=KEYED).name("StyleInputs"))
    versions = (inputs.filter(lambda k: k[0] != "dead")
                .key_by(lambda k: k[1], key_type=Types.STRING())
                .process(UpdateUserStyle(embedding_dim(clip), len(FEATURE_NAMES), settings.basis,
                                         args.publish_delay_s, confirm_after_s),
                         output_type=OUTGOING).name("UpdateUserStyle"))
    dead = inputs.filter(lambda k: k[0] == "dead").map(dead_letter_row, output_type=OUTGOING).name("DeadLetters")
    statements = t_env.create_statement_set()
    statements.add_insert("outgoing", t_env.from_data_stream(versions.union(dead)))
    statements.attach_as_datastream()
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stylestream.pipelines.flink_job", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    add_arguments(ap)
    ap.add_argument("--publish-delay-s", type=float, default=PUBLISH_DELAY_S, metavar="S")
    ap.add_argument("--checkpointing-interval-ms", type=int, default=2000, metavar="MS",
                    help="outputs become visible when the checkpoint after them completes")
    ap.add_argument("--checkpoint-dir", metavar="URI", help="where checkpoints go (default: DIR/checkpoints)")
    ap.add_argument("--retained-checkpoints", type=int, default=3, metavar="N",
                    help="complete checkpoints kept (older ones are deleted, with any forgotten person's state)")
    ap.add_argument("--transaction-timeout-s", type=int, default=None, metavar="S",
                    help="Kafka transaction timeout (default: the broker's transaction.max.timeout.ms): how long "
                         "readers wait for a crashed job's open transaction")
    ap.add_argument("--confirm-after-s", type=float, default=None, metavar="S",
                    help="publish again what is not read back from style-vectors this long after (default: "
                         "5 checkpoint intervals, at least 10 s)")
    ap.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                    help="serve Flink's metrics, the job's own included, for Prometheus on this port")
    ap.add_argument("--restore", metavar="latest|DIR",
                    help="start from this checkpoint (latest: the newest under a local --checkpoint-dir)")
    args = ap.parse_args(argv)
    settings = from_arguments(args)
    args.checkpoint_dir = args.checkpoint_dir or (settings.data_dir / "checkpoints").resolve().as_uri()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        ensure_topics(args.bootstrap_servers, settings.partitions)
        args.transaction_timeout_ms = transaction_timeout_ms(args.bootstrap_servers, args.transaction_timeout_s)
        settings.ensure_keys(say=lambda line: print(line, file=sys.stderr))
        settings.check_basis()
    except SettingsError as e:
        ap.exit(1, f"error: {e}\n")
    jars = connector_jars()
    if not jars:
        print("Flink's Kafka connector is not in the cache (`make flink` fetches it): using Flink's lib/",
              file=sys.stderr)
    # Ctrl-C or SIGTERM stops the job (its Flink, a child process, ends with this one); the state to
    # resume from is in the checkpoints. An interruption while PyFlink talks to its JVM surfaces as
    # whatever py4j makes of the broken exchange: after a stop was asked for, that is the stop too.
    stop_asked = []

    def stop(*_) -> None:
        stop_asked.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"transaction timeout {args.transaction_timeout_ms // 1000} s, parallelism {settings.parallelism}, "
          f"started {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    try:
        build_job(args, settings, jars).execute("stylestream")
    except BaseException as e:
        if not stop_asked:
            raise
        how = "" if isinstance(e, KeyboardInterrupt) else f" (PyFlink said {type(e).__name__} as it stopped)"
        print(f"stopped{how}; start again with --restore latest", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
