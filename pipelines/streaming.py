"""Ingestion past one machine: the same transforms as one unbounded Beam pipeline on a portable runner.

    python -m stylestream.pipelines.streaming --bootstrap-servers HOST:PORT --data-dir DIR \\
        [--runner PrismRunner] [any Beam pipeline option]

Differences from the local micro-batch driver (pipelines/ingest.py):
- Source: every partition of the input topics, read without end by a splittable DoFn
  (`transforms/kafka_read.ReadPartitions`; the runner checkpoints its claimed offsets), instead of
  planned offset ranges. Beam's cross-language ReadFromKafka would need Beam's Java expansion service.
- State: each user's style state lives in the runner as keyed state (`pipelines/streaming_state`:
  a small summary cell and one entry per photo, so an event touches what it changes), instead of
  DuckDB; a user's new version is published shortly after a change (a processing-time timer).
- Sinks: new style versions, re-ingested uploads and dead letters go to Kafka, at least once (a
  bundle the runner retries may publish again; readers keep the latest version per user); every
  published version is a row of Parquet history (pseudonymous, like the local driver's), and the
  rows of versions a withdrawal names are deleted from it.

Each user's update is decided by the same pure functions in both modes (transforms/style.py), which
are order-free, so one event at a time in any order gives the same style as micro-batches.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from stylestream.analytics.history import redact, write_atomically
from stylestream.analytics.pseudonyms import load_or_create_key, pseudonym
from stylestream.defaults import HALF_LIFE_DAYS, TINY_CLIP
from stylestream.models.clip import ClipSpec
from stylestream.pipelines.plan import NewVersion
from stylestream.pipelines.prism import ensure_prism
from stylestream.pipelines.streaming_state import PUBLISH_DELAY_S, REINGEST, UpdateUserStyle
from stylestream.pipelines.user_state import unerased
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import UserForgotten, to_message
from stylestream.schemas.tables import STYLE_HISTORY
from stylestream.streams import clients
from stylestream.streams.topics import INGEST_TOPICS, PHOTO_EVENTS, ensure_topics
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.inputs import StyleInputs
from stylestream.transforms.kafka_read import ReadPartitions
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.records import Sourced


def build_streaming(messages: beam.PCollection, clip: ClipSpec, dim: int, n_features: int,
                    half_life_days: float, limits: DecodeLimits | None = None,
                    publish_delay_s: float = PUBLISH_DELAY_S):
    """messages -> (new style versions (pipelines/plan.NewVersion), uploads to re-ingest, dead letters)."""
    limits = limits or DecodeLimits()
    inputs = messages | "StyleInputs" >> StyleInputs(clip, limits)
    consent = inputs["toggles"] | "ForgetsApart" >> beam.Partition(lambda s, _: is_forget(s), 2)
    updates = (inputs["contributions"], inputs["deletes"], consent[0]) | "UpdateUserStyle" >> UpdateUserStyle(
        dim, n_features, style_basis(clip, half_life_days, limits), publish_delay_s)
    unerased_forgets = consent[1] | "Unerased" >> beam.Map(unerased)
    dead = (inputs["dead"], unerased_forgets) | "DeadLetters" >> beam.Flatten()
    return updates.versions, updates[REINGEST], dead


def is_forget(sourced: Sourced) -> int:
    return int(isinstance(sourced.event, UserForgotten))


STREAM_CYCLE = 0  # the history's `cycle` of versions the streaming pipeline published (it has no cycles)


def history_entry(version: NewVersion, key: bytes) -> tuple[dict, tuple[str, int, int] | None]:
    """A version for the analytics history, under the user's keyed hash, and the range of the user's
    versions it withdraws (their rows must go)."""
    user = pseudonym(version.user_id, key)
    withdrawn = version.event.withdrawn_versions
    return (version.row(STREAM_CYCLE, version.event.event_time) | {"user_id": user},
            (user, min(withdrawn), max(withdrawn)) if withdrawn else None)


class _Publish(beam.DoFn):
    def __init__(self, bootstrap_servers: str):
        self._bootstrap = bootstrap_servers
        self._producer = None
        self._sent = []

    def setup(self):
        self._producer = clients.producer(self._bootstrap)

    def start_bundle(self):
        self._sent = []

    def process(self, message: tuple[str, bytes, bytes]):
        topic, key, value = message
        self._sent.append(self._producer.send(topic, key=key, value=value))

    def finish_bundle(self):
        # A bundle is done only once the broker acknowledged each message; a failed send fails the
        # bundle, which the runner retries (at least once: a retry may publish a message again).
        self._producer.flush()
        for sent in self._sent:
            sent.get()
        self._sent = []

    def teardown(self):
        if self._producer is not None:
            self._producer.close()


class PublishToKafka(beam.PTransform):
    """(topic, key, value) -> messages on the broker, acknowledged before the bundle completes."""

    def __init__(self, bootstrap_servers: str):
        super().__init__()
        self._bootstrap = bootstrap_servers

    def expand(self, messages):
        return messages | "Send" >> beam.ParDo(_Publish(self._bootstrap))


class _WriteHistoryFiles(beam.DoFn):
    def __init__(self, history_dir: str):
        self._dir = Path(history_dir)
        self._rows: list[dict] = []
        self._withdrawn: list[tuple[str, int, int]] = []

    def start_bundle(self):
        self._rows, self._withdrawn = [], []

    def process(self, entry: tuple[dict, tuple[str, int, int] | None]):
        row, withdrawn = entry
        self._rows.append(row)
        if withdrawn:
            self._withdrawn.append(withdrawn)

    def finish_bundle(self):
        if self._rows:
            now = datetime.now(UTC)
            rows = sorted(self._rows, key=lambda r: (r["user_id"], r["version"]))
            path = self._dir / f"date={now.date().isoformat()}" / f"stream-{uuid.uuid4().hex}.parquet"
            write_atomically(pa.Table.from_pylist(rows, STYLE_HISTORY), path)
        redact(self._dir, self._withdrawn)
        self._rows, self._withdrawn = [], []


class WriteHistory(beam.PTransform):
    """(history row, withdrawn (user, first, last) or None) -> one Parquet file per bundle under
    `history_dir/date=<day>/`; then the rows of the versions withdrawn are deleted from every file."""

    def __init__(self, history_dir: str):
        super().__init__()
        self._dir = history_dir

    def expand(self, rows):
        return rows | "Write" >> beam.ParDo(_WriteHistoryFiles(self._dir))


def streaming_pipeline(p: beam.Pipeline, bootstrap_servers: str, clip: ClipSpec, history_dir: str,
                       pseudonym_key: bytes, half_life_days: float = HALF_LIFE_DAYS,
                       publish_delay_s: float = PUBLISH_DELAY_S) -> None:
    """The whole unbounded job: Kafka in, style versions, re-ingestion and dead letters to Kafka,
    history to Parquet."""
    from stylestream.models.clip import embedding_dim
    from stylestream.schemas.tables import FEATURE_NAMES

    messages = p | "ReadKafka" >> ReadPartitions(bootstrap_servers, list(INGEST_TOPICS))
    versions, reingest, dead = build_streaming(messages, clip, embedding_dim(clip), len(FEATURE_NAMES),
                                               half_life_days, publish_delay_s=publish_delay_s)
    outgoing = (
        versions | "VersionMessages" >> beam.FlatMap(NewVersion.messages),
        reingest | "ReingestMessages" >> beam.Map(lambda u: (PHOTO_EVENTS, *to_message(u))),
        dead | "DeadLetterMessages" >> beam.Map(DeadLetter.message),
    )
    outgoing | "Outgoing" >> beam.Flatten() | "Publish" >> PublishToKafka(bootstrap_servers)
    (versions | "HistoryRows" >> beam.Map(history_entry, pseudonym_key)
     | "WriteHistory" >> WriteHistory(history_dir))


def runner_args(beam_args: list[str]) -> list[str]:
    """Beam's options with this project's defaults: Prism (as built by `make prism`), and SDK workers
    in this process (LOOPBACK: no Docker engine needed)."""
    given = {a.split("=")[0] for a in beam_args if a.startswith("--")}
    defaults = {"--runner": "PrismRunner", "--environment_type": "LOOPBACK"}
    runner = PipelineOptions([*beam_args, "--runner=PrismRunner"] if "--runner" not in given else beam_args
                             ).view_as(StandardOptions).runner
    if runner == "PrismRunner" and "--prism_location" not in given:
        defaults["--prism_location"] = str(ensure_prism())
    return list(beam_args) + [f"{k}={v}" for k, v in defaults.items() if k not in given]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m stylestream.pipelines.streaming",
        description="Unbounded ingestion on a Beam portable runner (Prism by default): reads photo-events and "
                    "consent-events from Kafka until stopped (Ctrl-C or SIGTERM cancels the job), keeps each "
                    "user's style state in the runner, publishes style versions to Kafka and writes their "
                    "history to Parquet. Other arguments are Beam pipeline options.",
        epilog="example: python -m stylestream.pipelines.streaming --bootstrap-servers 127.0.0.1:9092 "
               "--data-dir /srv/stylestream-stream --runner PrismRunner")
    ap.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    ap.add_argument("--data-dir", required=True, type=Path, metavar="DIR",
                    help="history/ (Parquet) and the analytics key file go here")
    ap.add_argument("--clip-model", default=TINY_CLIP, metavar="NAME")
    ap.add_argument("--clip-pretrained", default=None, metavar="TAG|FILE",
                    help="checkpoint path or tag, readable by the workers (default: random weights for the tiny model)")
    ap.add_argument("--half-life-days", type=float, default=HALF_LIFE_DAYS, metavar="DAYS")
    ap.add_argument("--publish-delay-s", type=float, default=PUBLISH_DELAY_S, metavar="S",
                    help="a user's new style version is published at most this long after their first change")
    args, beam_args = ap.parse_known_args(argv)
    try:
        options = PipelineOptions(runner_args(beam_args), streaming=True)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        ap.exit(1, f"error: {e}\n")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(args.bootstrap_servers)
    key = load_or_create_key(args.data_dir)
    p = beam.Pipeline(options=options)
    streaming_pipeline(p, args.bootstrap_servers, ClipSpec(args.clip_model, args.clip_pretrained),
                       str(args.data_dir / "history"), key, args.half_life_days, args.publish_delay_s)
    result = p.run()
    # SIGTERM (a service manager, a test) stops the job like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:
        result.cancel()


if __name__ == "__main__":
    main()
