"""Ingestion past one machine: the same transforms as a streaming pipeline for a distributed runner.

Differences from the local micro-batch driver (pipelines/ingest.py):
- Source: Beam's ReadFromKafka (a cross-language transform; the runner's expansion service reads
  every partition in parallel and checkpoints offsets) instead of planned offset ranges.
- State: each user's style state lives in the runner as per-key state of `UpdateUserStyle`
  (Flink: RocksDB state backend; Dataflow: its managed state), instead of DuckDB. Exactly-once
  comes from the runner's checkpoints, which cover source offsets and state together.
- Sinks: new style versions go to the style-vectors topic and, per window, to Parquet files.

Each user's update is planned by the same pure function in both modes (`plan_user`, which builds the
style-vector event with its facets and withdrawn versions), and it is order-free, so one event at a
time in any order gives the same style as micro-batches.
`run_bounded` runs this pipeline here over a bounded offset range on FnApiRunner, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
from apache_beam.coders import PickleCoder
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from stylestream.analytics.pseudonyms import load_key, pseudonym
from stylestream.defaults import HALF_LIFE_DAYS
from stylestream.models.clip import ClipSpec
from stylestream.pipelines.plan import NewVersion, plan_user
from stylestream.schemas.events import PhotoUploaded, encode_event
from stylestream.schemas.tables import STYLE_HISTORY
from stylestream.streams.clients import Message
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.inputs import StyleInputs
from stylestream.transforms.kafka_read import OffsetRange, ReadOffsetRanges
from stylestream.transforms.records import UserBatch
from stylestream.transforms.style import UserView

REINGEST = "reingest"


@dataclass
class UserState:
    """Everything the runner keeps for one user."""

    view: UserView
    uploads: dict[str, PhotoUploaded] = field(default_factory=dict)  # catalogued uploads, for re-ingestion


def kafka_source(bootstrap_servers: str, topics: list[str]) -> beam.PTransform:
    """Every partition of `topics`, read in parallel by the runner (needs Beam's Java expansion
    service, which the Flink and Dataflow runners provide)."""
    from apache_beam.io.kafka import ReadFromKafka

    return (ReadFromKafka(consumer_config={"bootstrap.servers": bootstrap_servers,
                                           "auto.offset.reset": "earliest"},
                          topics=topics, with_metadata=True)
            | "ToMessage" >> beam.Map(lambda r: Message(r.topic, r.partition, r.offset, r.key, r.value,
                                                        r.timestamp)))


class _UpdateUserStyle(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("user_style", PickleCoder())

    def __init__(self, dim: int, n_features: int, half_life_days: float):
        self._dim, self._n_features, self._half_life = dim, n_features, half_life_days

    def process(self, keyed: tuple[str, UserBatch], state=beam.DoFn.StateParam(STATE)):  # noqa: B008 (Beam idiom)
        _, batch = keyed
        current = state.read() or UserState(UserView.empty(self._dim, self._n_features))
        plan = plan_user(current.view, batch, self._half_life, datetime.now(UTC))
        uploads = {**current.uploads, **{c.photo_id: c.upload for c in plan.update.catalog}}
        for photo_id in plan.update.tombstones:
            uploads.pop(photo_id, None)
        state.write(UserState(plan.after, uploads))
        for photo_id in plan.update.reingest:
            yield beam.pvalue.TaggedOutput(REINGEST, uploads[photo_id])
        if plan.version:
            yield plan.version


class UpdateUserStyle(beam.PTransform):
    """Per-user style state in the runner: (contributions, deletes, toggles) -> new style versions,
    and (tagged `reingest`) uploads to publish again after an opt-in."""

    def __init__(self, dim: int, n_features: int, half_life_days: float):
        super().__init__()
        self._fn = _UpdateUserStyle(dim, n_features, half_life_days)

    def expand(self, pcolls):
        contributions, deletes, toggles = pcolls
        return (
            (contributions | "UploadBatch" >> beam.Map(lambda c: (c.user_id, UserBatch(c.user_id, contributions=[c]))),
             deletes | "DeleteBatch" >> beam.Map(lambda s: (s.event.user_id, UserBatch(s.event.user_id,
                                                                                        deletes=[s.event]))),
             toggles | "ToggleBatch" >> beam.Map(lambda s: (s.event.user_id, UserBatch(s.event.user_id,
                                                                                        toggles=[s.event]))))
            | "OneStream" >> beam.Flatten()
            | "PerUser" >> beam.ParDo(self._fn).with_outputs(REINGEST, main="versions")
        )


def build_streaming(messages: beam.PCollection, clip: ClipSpec, dim: int, n_features: int,
                    half_life_days: float, limits: DecodeLimits | None = None):
    """messages -> (new style versions (pipelines/plan.NewVersion), uploads to re-ingest, dead letters)."""
    inputs = messages | "StyleInputs" >> StyleInputs(clip, limits)
    updates = (inputs["contributions"], inputs["deletes"], inputs["toggles"]) | "UpdateUserStyle" >> UpdateUserStyle(
        dim, n_features, half_life_days)
    return updates.versions, updates[REINGEST], inputs["dead"]


HISTORY_SCHEMA = pa.schema([STYLE_HISTORY.field(n) for n in
                            ("user_id", "version", "photo_count", "total_weight", "embedding", "features")])


def history_row(version: NewVersion, key: bytes) -> dict:
    """A version for the analytics history: the user id replaced by its keyed hash."""
    embedding, features = version.update.stats.vector()
    return {"user_id": pseudonym(version.user_id, key), "version": version.version,
            "photo_count": version.update.stats.count, "total_weight": version.update.stats.total_weight,
            "embedding": embedding.tolist(), "features": features.tolist()}


def run_bounded(bootstrap_servers: str, ranges: list[OffsetRange], clip: ClipSpec, dim: int, n_features: int,
                output_prefix: str, pseudonym_key: bytes, half_life_days: float = HALF_LIFE_DAYS,
                vectors_prefix: str | None = None) -> None:
    """The streaming pipeline over a bounded offset range on FnApiRunner: Parquet files of every
    style version under `output_prefix` and, with `vectors_prefix`, the style-vector events it
    publishes, as JSON lines."""
    with beam.Pipeline(runner=FnApiRunner()) as p:
        messages = (p | "Ranges" >> beam.Create(ranges, reshuffle=False)
                    | "ReadKafka" >> ReadOffsetRanges(bootstrap_servers))
        versions, _, _ = build_streaming(messages, clip, dim, n_features, half_life_days)
        (versions | "HistoryRows" >> beam.Map(history_row, pseudonym_key)
         | "WriteHistory" >> beam.io.WriteToParquet(output_prefix, HISTORY_SCHEMA, file_name_suffix=".parquet"))
        if vectors_prefix:
            (versions | "VectorEvents" >> beam.Map(lambda v: to_vector_message(v)[1].decode())
             | "WriteVectors" >> beam.io.WriteToText(vectors_prefix, file_name_suffix=".jsonl"))


def to_vector_message(version: NewVersion) -> tuple[bytes, bytes]:
    """A style version as a style-vectors message (key: user id)."""
    return version.user_id.encode(), encode_event(version.event)


def main(argv: list[str] | None = None) -> None:
    """Unbounded ingestion on a distributed runner; see infra/README.md for Flink and Dataflow."""
    import argparse

    from apache_beam.io.kafka import WriteToKafka
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from stylestream.models.clip import embedding_dim
    from stylestream.schemas.tables import FEATURE_NAMES
    from stylestream.streams.topics import INGEST_TOPICS, PHOTO_EVENTS, STYLE_VECTORS, dlq

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--bootstrap-servers", required=True)
    ap.add_argument("--clip-model", required=True)
    ap.add_argument("--clip-pretrained", required=True, help="checkpoint path or tag, readable by the workers")
    ap.add_argument("--history", required=True, help="Parquet history prefix, e.g. gs://bucket/stylestream/history")
    ap.add_argument("--analytics-key-file", required=True, type=Path,
                    help="the key that turns user ids into the history's pseudonyms (see analytics/pseudonyms.py)")
    ap.add_argument("--half-life-days", type=float, default=HALF_LIFE_DAYS)
    args, beam_args = ap.parse_known_args(argv)
    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = True
    clip = ClipSpec(args.clip_model, args.clip_pretrained)
    producer = {"bootstrap.servers": args.bootstrap_servers}
    with beam.Pipeline(options=options) as p:
        messages = p | "ReadKafka" >> kafka_source(args.bootstrap_servers, list(INGEST_TOPICS))
        versions, reingest, dead = build_streaming(messages, clip, embedding_dim(clip), len(FEATURE_NAMES),
                                                   args.half_life_days)
        (versions | "VectorMessages" >> beam.Map(to_vector_message).with_output_types(tuple[bytes, bytes])
         | "PublishVectors" >> WriteToKafka(producer, STYLE_VECTORS))
        (reingest | "ReingestMessages" >> beam.Map(lambda u: (u.user_id.encode(), encode_event(u)))
         .with_output_types(tuple[bytes, bytes]) | "Reingest" >> WriteToKafka(producer, PHOTO_EVENTS))
        for topic in INGEST_TOPICS:
            (dead | f"DeadLetters-{topic}" >> beam.Filter(lambda d, t=topic: d.topic == t)
             | f"DeadLetterMessages-{topic}" >> beam.Map(lambda d: (d.key or b"", d.to_json()))
             .with_output_types(tuple[bytes, bytes]) | f"Publish-{dlq(topic)}" >> WriteToKafka(producer, dlq(topic)))
        (versions | "HistoryRows" >> beam.Map(history_row, load_key(args.analytics_key_file))
         | "HistoryWindows" >> beam.WindowInto(beam.window.FixedWindows(60))
         | "WriteHistory" >> beam.io.WriteToParquet(args.history, HISTORY_SCHEMA, file_name_suffix=".parquet",
                                                    triggering_frequency=60))


if __name__ == "__main__":
    main()
