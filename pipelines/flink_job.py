"""The streaming pipeline's steps as a job on Apache Flink (PyFlink), with Flink's checkpoints.

    python -m stylestream.pipelines.flink_job --bootstrap-servers HOST:PORT --data-dir DIR [--restore latest]

Run with the Flink environment's Python (`make flink`; `pipelines/flink_setup.py`): PyFlink pins an
older Beam than the project's. Beam's own FlinkRunner would run `pipelines/streaming.py` unchanged, but
its job server is not served by the Maven Central these machines reach (infra/README.md); this job is
the same steps written against Flink's API instead:

  Kafka (Flink's connector: photo-events, consent-events, with topic/partition/offset, read_committed)
    -> style_input (transforms/inputs.py: parse, fetch, decode, strip, embed; or a dead letter)
    -> keyed by user: apply_batch / publish_latest (pipelines/user_state.py) over Flink keyed state
       (a value for the summary, map states for the photos and the album index), publish timer in
       processing time
    -> Kafka (style-vectors, photo-events for re-ingestion, dead-letter topics), in Kafka transactions
       committed with each checkpoint: exactly once across a crash and a restore.

Checkpoints go to DIR/checkpoints (or --checkpoint-dir) and are kept when the job stops; `--restore
latest` starts from the newest complete one (sources' offsets, users' state and pending timers). The Parquet history
is written by the Beam pipelines only.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
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

from stylestream.defaults import HALF_LIFE_DAYS, TINY_CLIP
from stylestream.models.clip import ClipSpec, embedding_dim
from stylestream.pipelines.flink_setup import connector_jars
from stylestream.pipelines.user_state import (
    PUBLISH_DELAY_S,
    PhotoEntry,
    UserSummary,
    album_index_changes,
    apply_batch,
    changed_entries,
    publish_latest,
    unerased,
)
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import StyleBasis, UserForgotten, to_message
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.clients import Message
from stylestream.streams.topics import (
    INGEST_TOPICS,
    MAX_MESSAGE_BYTES,
    PHOTO_EVENTS,
    STYLE_MANIFESTS,
    STYLE_VECTORS,
    dlq,
)
from stylestream.transforms.embed import OpenClipImageHandler, photo_image
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.inputs import style_input
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.records import Contribution, Sourced, UserBatch

OUTGOING = Types.ROW_NAMED(["topic", "key", "value"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()),
                                                       Types.PRIMITIVE_ARRAY(Types.BYTE())])
# `topic` picks one per row
OUTGOING_TOPICS = [STYLE_VECTORS, STYLE_MANIFESTS, PHOTO_EVENTS, *(dlq(t) for t in INGEST_TOPICS)]
# (kind, user, pickled UserBatch or DeadLetter): kind "update" goes to the user's state, "dead" out
KEYED = Types.TUPLE([Types.STRING(), Types.STRING(), Types.PICKLED_BYTE_ARRAY()])


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


class StyleInputs(FlatMapFunction):
    """Kafka rows -> (user, UserBatch) to update, or dead letters as outgoing rows."""

    def __init__(self, clip: ClipSpec):
        self._clip = clip

    def open(self, runtime_context: RuntimeContext):
        handler = OpenClipImageHandler(self._clip, image_of=photo_image)
        model = handler.load_model()
        self._embed = lambda photo: handler.run_inference([photo], model)[0].inference
        self._limits = DecodeLimits()

    def flat_map(self, row):
        key, value, topic, partition, offset, ts = row
        msg = Message(topic, partition, offset, bytes(key) if key is not None else None,
                      bytes(value) if value is not None else None, ts.to_epoch_milli() if ts is not None else 0)
        out = style_input(msg, self._limits, self._embed)
        if isinstance(out, Sourced) and isinstance(out.event, UserForgotten):
            out = unerased(out)
        if isinstance(out, DeadLetter):
            yield "dead", "", pickle.dumps(out)
        else:
            yield "update", out.user_id if isinstance(out, Contribution) else out.event.user_id, pickle.dumps(
                UserBatch.of(out))


def dead_letter_row(keyed) -> Row:
    d: DeadLetter = pickle.loads(keyed[2])
    return Row(*d.message())


class UpdateUserStyle(KeyedProcessFunction):
    """Each user's style state in Flink keyed state; emits outgoing rows."""

    def __init__(self, dim: int, n_features: int, basis: StyleBasis, publish_delay_s: float):
        self._dim, self._n_features = dim, n_features
        self._basis, self._delay_ms = basis, int(publish_delay_s * 1000)

    def open(self, ctx: RuntimeContext):
        raw = Types.PICKLED_BYTE_ARRAY()
        self._summary = ctx.get_state(ValueStateDescriptor("summary", raw))
        self._photos = ctx.get_map_state(MapStateDescriptor("photos", Types.STRING(), raw))
        self._albums = ctx.get_map_state(MapStateDescriptor("albums", Types.STRING(), raw))

    def _cells(self) -> MapStateCells:
        return MapStateCells(self._summary, self._photos, self._albums)

    def _empty(self) -> UserSummary:
        return UserSummary.empty(self._dim, self._n_features)

    def process_element(self, keyed, ctx: KeyedProcessFunction.Context):
        applied = apply_batch(self._cells(), pickle.loads(keyed[2]), self._empty(), self._basis)
        if applied.changed:
            # On the next multiple of the delay after it: Flink keeps one timer per key and time, so
            # a burst registers one, and a change after a restore registers one whatever the restored
            # state says is pending.
            ts = ctx.timer_service()
            due = ts.current_processing_time() + self._delay_ms
            ts.register_processing_time_timer(-(-due // self._delay_ms) * self._delay_ms)
        for upload in applied.reingest:
            yield Row(PHOTO_EVENTS, *to_message(upload))

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        user_id = ctx.get_current_key()
        version = publish_latest(self._cells(), user_id, self._empty(), self._basis, datetime.now(UTC))
        if version is not None:
            for message in version.messages():
                yield Row(*message)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints` (Flink's <job id>/chk-<n>/_metadata)."""
    done = [m.parent for m in checkpoints.glob("*/chk-*/_metadata")]
    return max(done, key=lambda d: (d.stat().st_mtime, int(d.name.split("-")[1])), default=None)


def build_job(args, jars: list[Path]) -> StreamExecutionEnvironment:
    conf = Configuration()
    if jars:  # else Flink's own lib/ must hold the connector (a cluster image)
        conf.set_string("pipeline.jars", ";".join(p.resolve().as_uri() for p in jars))
    conf.set_string("python.executable", sys.executable)
    conf.set_string("python.execution-mode", "process")
    conf.set_string("execution.checkpointing.interval", f"{args.checkpointing_interval_ms} ms")
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", args.checkpoint_dir)
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("state.backend.type", "rocksdb")
    if args.restore:
        local = Path(args.checkpoint_dir.removeprefix("file://"))
        path = latest_checkpoint(local) if args.restore == "latest" else Path(args.restore)
        if path is not None:
            print(f"restoring from {path}", file=sys.stderr, flush=True)
            conf.set_string("execution.state-recovery.path", path.resolve().as_uri())
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(args.parallelism)
    t_env = StreamTableEnvironment.create(env)
    kafka = (f"'connector' = 'kafka', 'properties.bootstrap.servers' = '{args.bootstrap_servers}', "
             "'key.format' = 'raw', 'value.format' = 'raw', 'key.fields' = 'key', "
             "'value.fields-include' = 'EXCEPT_KEY'")
    t_env.execute_sql(f"""
        CREATE TABLE incoming (
          `key` BYTES, `value` BYTES, `topic` STRING METADATA VIRTUAL, `partition` INT METADATA VIRTUAL,
          `offset` BIGINT METADATA VIRTUAL, `ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL
        ) WITH ({kafka}, 'topic' = '{";".join(INGEST_TOPICS)}', 'scan.startup.mode' = 'earliest-offset',
                'properties.group.id' = 'stylestream-flink', 'properties.isolation.level' = 'read_committed')""")
    # Outgoing messages in Kafka transactions, committed with each checkpoint. After a crash, readers
    # (read_committed) wait for the killed job's open transaction until it times out; a job down for
    # longer than that loses the outputs of its last checkpoint, whose transaction the broker aborted.
    t_env.execute_sql(f"""
        CREATE TABLE outgoing (`topic` STRING METADATA, `key` BYTES, `value` BYTES)
        WITH ({kafka}, 'topic' = '{";".join(OUTGOING_TOPICS)}', 'sink.delivery-guarantee' = 'exactly-once',
              'sink.transactional-id-prefix' = 'stylestream-flink',
              'properties.max.request.size' = '{MAX_MESSAGE_BYTES}',
              'properties.transaction.timeout.ms' = '{args.transaction_timeout_s * 1000}')""")

    clip = ClipSpec(args.clip_model, args.clip_pretrained)
    inputs = (t_env.to_data_stream(t_env.from_path("incoming"))
              .flat_map(StyleInputs(clip), output_type=KEYED).name("StyleInputs"))
    versions = (inputs.filter(lambda k: k[0] == "update")
                .key_by(lambda k: k[1], key_type=Types.STRING())
                .process(UpdateUserStyle(embedding_dim(clip), len(FEATURE_NAMES),
                                         style_basis(clip, args.half_life_days, DecodeLimits()),
                                         args.publish_delay_s), output_type=OUTGOING).name("UpdateUserStyle"))
    dead = inputs.filter(lambda k: k[0] == "dead").map(dead_letter_row, output_type=OUTGOING).name("DeadLetters")
    statements = t_env.create_statement_set()
    statements.add_insert("outgoing", t_env.from_data_stream(versions.union(dead)))
    statements.attach_as_datastream()
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stylestream.pipelines.flink_job", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    ap.add_argument("--data-dir", required=True, type=Path, metavar="DIR", help="checkpoints go under DIR/checkpoints")
    ap.add_argument("--clip-model", default=TINY_CLIP, metavar="NAME")
    ap.add_argument("--clip-pretrained", default=None, metavar="TAG|FILE")
    ap.add_argument("--half-life-days", type=float, default=HALF_LIFE_DAYS, metavar="DAYS")
    ap.add_argument("--publish-delay-s", type=float, default=PUBLISH_DELAY_S, metavar="S")
    ap.add_argument("--parallelism", type=int, default=2, metavar="N")
    ap.add_argument("--checkpointing-interval-ms", type=int, default=2000, metavar="MS",
                    help="outputs become visible when the checkpoint after them completes")
    ap.add_argument("--checkpoint-dir", metavar="URI", help="where checkpoints go (default: DIR/checkpoints)")
    ap.add_argument("--transaction-timeout-s", type=int, default=60, metavar="S",
                    help="Kafka transaction timeout: how long readers wait after a crash, and the longest "
                         "a job may be down without losing its last checkpoint's outputs (at most 900)")
    ap.add_argument("--restore", metavar="latest|DIR",
                    help="start from this checkpoint (latest: the newest under a local --checkpoint-dir)")
    args = ap.parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or (args.data_dir / "checkpoints").resolve().as_uri()
    jars = connector_jars()
    if not jars:
        print("Flink's Kafka connector is not in the cache (`make flink` fetches it): using Flink's lib/",
              file=sys.stderr)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = build_job(args, jars)
    env.execute("stylestream")


if __name__ == "__main__":
    main()
