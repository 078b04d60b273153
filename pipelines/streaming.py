"""Ingestion past one machine: the same transforms as one unbounded Beam pipeline on a portable runner.

    python -m stylestream.pipelines.streaming --bootstrap-servers HOST:PORT --data-dir DIR \\
        [--runner PrismRunner] [any Beam pipeline option]

Differences from the local micro-batch driver (pipelines/ingest.py):
- Source: every partition of the input topics, read without end by a splittable DoFn
  (`transforms/kafka_read.ReadPartitions`; the runner checkpoints its claimed offsets), instead of
  planned offset ranges. Beam's cross-language ReadFromKafka would need Beam's Java expansion service.
- State: each user's style state lives in the runner as keyed state (`pipelines/streaming_state`:
  a small summary cell and one entry per photo, so an event touches what it changes), instead of
  DuckDB; a user's new version is published shortly after a change (a processing-time timer). A
  forget request clears the person's state there and publishes their tombstones.
- Sinks: new style versions, manifests, tombstones, re-ingested uploads and dead letters go to
  Kafka, at least once (a bundle the runner retries may publish again; readers keep the latest
  version per user). The Parquet history, and what of a forgotten person lies beside the state, are
  the history writer's (pipelines/history_writer.py), which reads the published style vectors.

Prism, the development runner, keeps its state in memory: a restart would rebuild styles from what
the topics still hold and number versions from 1 again, so it refuses to start against a
style-vectors topic that already holds versions (the Flink job restores from its checkpoints).

Each user's update is decided by the same pure functions in both modes (transforms/style.py), which
are order-free, so one event at a time in any order gives the same style as micro-batches.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions, StandardOptions

from stylestream.models.clip import ClipSpec, embedding_dim
from stylestream.pipelines.plan import NewVersion
from stylestream.pipelines.prism import ensure_prism
from stylestream.pipelines.settings import IngestSettings, SettingsError, add_arguments, from_arguments
from stylestream.pipelines.streaming_state import ERASED, PUBLISH_DELAY_S, REFUSED, REINGEST, UpdateUserStyle
from stylestream.schemas.dead_letters import DeadLetter
from stylestream.schemas.events import StyleBasis, to_message
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams import clients
from stylestream.streams.topics import INGEST_TOPICS, PHOTO_EVENTS, STYLE_VECTORS, ensure_topics
from stylestream.transforms.images import DecodeLimits
from stylestream.transforms.inputs import StyleInputs
from stylestream.transforms.kafka_read import ReadPartitions


def build_streaming(messages: beam.PCollection, clip: ClipSpec, limits: DecodeLimits, basis: StyleBasis,
                    key: bytes, publish_delay_s: float = PUBLISH_DELAY_S):
    """messages -> (new style versions (pipelines/plan.NewVersion), uploads to re-ingest, the
    tombstones of people forgotten as (topic, key, value), dead letters). `key`: the state's
    analytics key (erasure subjects key the state)."""
    inputs = messages | "StyleInputs" >> StyleInputs(clip, limits)
    updates = (inputs["contributions"], inputs["deletes"], inputs["toggles"]) | "UpdateUserStyle" >> UpdateUserStyle(
        embedding_dim(clip), len(FEATURE_NAMES), basis, key, publish_delay_s)
    dead = (inputs["dead"], updates[REFUSED]) | "DeadLetters" >> beam.Flatten()
    return updates.versions, updates[REINGEST], updates[ERASED], dead


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
        clients.acknowledged(self._producer, self._sent)
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


def streaming_pipeline(p: beam.Pipeline, bootstrap_servers: str, settings: IngestSettings,
                       publish_delay_s: float = PUBLISH_DELAY_S) -> None:
    """The whole unbounded job: Kafka in; style versions and manifests, tombstones, re-ingestion and
    dead letters to Kafka."""
    messages = p | "ReadKafka" >> ReadPartitions(bootstrap_servers, list(INGEST_TOPICS))
    versions, reingest, erased, dead = build_streaming(messages, settings.clip, settings.limits, settings.basis,
                                                       settings.analytics_key(), publish_delay_s)
    outgoing = (
        versions | "VersionMessages" >> beam.FlatMap(NewVersion.messages),
        erased,
        reingest | "ReingestMessages" >> beam.Map(lambda u: (PHOTO_EVENTS, *to_message(u))),
        dead | "DeadLetterMessages" >> beam.Map(DeadLetter.message),
    )
    outgoing | "Outgoing" >> beam.Flatten() | "Publish" >> PublishToKafka(bootstrap_servers)


class OutputsNotEmpty(RuntimeError):
    """Prism would number versions from 1 again over versions an earlier run published."""


def check_outputs_empty(bootstrap_servers: str) -> None:
    """Prism starts from empty state: refuse a style-vectors topic that already holds versions."""
    c = clients.consumer(bootstrap_servers)
    try:
        held = sum(clients.true_end_offsets(c, clients.partitions_of(c, STYLE_VECTORS)).values())
    finally:
        c.close()
    if held:
        raise OutputsNotEmpty(
            f"{STYLE_VECTORS} already holds {held} messages from an earlier run. Prism keeps its state in memory: "
            "restarted, it would rebuild styles from what the topics still hold and number versions from 1 "
            "again, under the ones serving keeps. Run it against empty topics (a new broker), or run the Flink "
            "job, which restores its state from checkpoints (infra/README.md)")


# Beam's portable runner opens the job's state stream under `--job_server_timeout` (300 s by default),
# and `wait_until_finish` fails when that deadline passes: an unbounded job would end after five minutes.
# Beam also waits that long for a job server given by `--job_endpoint` to answer: pass a shorter
# `--job_server_timeout` there to fail fast on a wrong address (the job then ends after that long).
JOB_SERVER_TIMEOUT_S = 10 * 365 * 24 * 3600
# Prism splits a bundle that made no progress between two progress reports, and the split frees the keys
# of the elements it hands back while the bundle still holds those keys' state: a stateful step then runs
# one key in two bundles at once, and the later commit overwrites the earlier (Beam 2.77: a person's
# opt-out was lost that way, under load). The job's Kafka read checkpoints itself and needs no split.
PRISM_NO_SPLITS = "prism_disable_sdf_split"


def is_prism(runner: str | None) -> bool:
    """Whether Beam's runner option names Prism, in any spelling Beam takes (PrismRunner, prism, a dotted path)."""
    return (runner or "").rsplit(".", 1)[-1].lower().removesuffix("runner") == "prism"


def runner_args(beam_args: list[str]) -> list[str]:
    """Beam's options with this project's defaults: Prism (as built by `make prism`, its splits off:
    `PRISM_NO_SPLITS`), SDK workers in this process (LOOPBACK: no Docker engine needed), and a job service
    deadline an unbounded job outlives never (`JOB_SERVER_TIMEOUT_S`)."""
    given = {a.split("=")[0] for a in beam_args if a.startswith("--")}
    if "--job-server-timeout" in given:  # the one option Beam also takes with dashes
        given.add("--job_server_timeout")
    defaults = {"--runner": "PrismRunner", "--environment_type": "LOOPBACK",
                "--job_server_timeout": JOB_SERVER_TIMEOUT_S}
    options = PipelineOptions([*beam_args, "--runner=PrismRunner"] if "--runner" not in given else beam_args)
    experiments = []
    if is_prism(options.view_as(StandardOptions).runner):
        if "--prism_location" not in given:
            defaults["--prism_location"] = str(ensure_prism())
        if PRISM_NO_SPLITS not in (options.view_as(DebugOptions).experiments or []):
            experiments.append(f"--experiments={PRISM_NO_SPLITS}")  # added to any a person gives
    return list(beam_args) + [f"{k}={v}" for k, v in defaults.items() if k not in given] + experiments


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m stylestream.pipelines.streaming",
        description="Unbounded ingestion on a Beam portable runner (Prism by default): reads photo-events and "
                    "consent-events from Kafka until stopped (Ctrl-C or SIGTERM cancels the job), keeps each "
                    "user's style state in the runner and publishes style versions, manifests and tombstones "
                    "to Kafka; run `stylestream history follow` beside it for the Parquet history and "
                    "erasures. Other arguments are Beam pipeline options.",
        epilog="example: python -m stylestream.pipelines.streaming --bootstrap-servers 127.0.0.1:9092 "
               "--data-dir /srv/stylestream-stream --runner PrismRunner")
    ap.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    add_arguments(ap)
    ap.add_argument("--publish-delay-s", type=float, default=PUBLISH_DELAY_S, metavar="S",
                    help="a user's new style version is published at most this long after their first change")
    args, beam_args = ap.parse_known_args(argv)
    settings = from_arguments(args)
    try:
        options = PipelineOptions(runner_args(beam_args), streaming=True)
        ensure_topics(args.bootstrap_servers, settings.partitions)
        if is_prism(options.view_as(StandardOptions).runner):
            check_outputs_empty(args.bootstrap_servers)
        settings.ensure_keys(say=lambda line: print(line, file=sys.stderr))
        settings.check_basis()
    except (RuntimeError, subprocess.CalledProcessError, SettingsError) as e:
        ap.exit(1, f"error: {e}\n")
    p = beam.Pipeline(options=options)
    streaming_pipeline(p, args.bootstrap_servers, settings, args.publish_delay_s)
    result = p.run()
    # SIGTERM (a service manager, a test) stops the job like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:
        result.cancel()


if __name__ == "__main__":
    main()
