"""Each Beam step alone, as Beam's own examples test theirs: TestPipeline and assert_that, in-memory
inputs, no broker."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions, PortableOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # not collected as a test
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from stylestream.demo.synthetic import make_library, toggle_event
from stylestream.models.clip import ClipSpec
from stylestream.pipelines.streaming import JOB_SERVER_TIMEOUT_S, PRISM_NO_SPLITS, build_streaming, runner_args
from stylestream.pipelines.streaming_state import UpdateUserStyle
from stylestream.schemas.events import UserForgotten, encode_event, parse_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.clients import Message
from stylestream.streams.topics import CONSENT_EVENTS, PHOTO_EVENTS, STYLE_MANIFESTS, STYLE_VECTORS
from stylestream.transforms.grouping import GroupByUser
from stylestream.transforms.images import (
    DecodeLimits,
    PhotoError,
    PreparePhotos,
    batchable_jpeg,
    photo_bytes,
    prepare_photo,
)
from stylestream.transforms.manifest import style_basis
from stylestream.transforms.parse import ParseEvents
from stylestream.transforms.records import Contribution, Sourced

WHEN = datetime(2026, 3, 1, tzinfo=UTC)
KEY = b"k" * 32  # the state's analytics key: erasure subjects key the runner's state
# Each step runs on Prism, the portable runner the streaming pipeline runs on (`make prism` builds it;
# keyed ordered-list state and processing-time timers need it: FnApiRunner has neither).
def prism() -> PipelineOptions:
    return PipelineOptions(runner_args([]))


def message(topic: str, offset: int, event=None, key: bytes | None = None, value: bytes | None = None) -> Message:
    return Message(topic, 0, offset, key if key is not None else event.user_id.encode(),
                   value if value is not None else encode_event(event), 0)


def sourced(event, offset: int = 0) -> Sourced:
    topic = CONSENT_EVENTS if event.type == "style_learning_toggled" else PHOTO_EVENTS
    return Sourced(event, topic, 0, offset, encode_event(event))


def contribution(photo, seed: int) -> Contribution:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=8).astype(np.float32)
    return Contribution(photo.upload_event(), e / np.linalg.norm(e), rng.random(len(FEATURE_NAMES)).astype(np.float32))


def test_the_streaming_job_outlives_the_job_services_default_deadline():
    # Beam's default (300 s) is the deadline of the job's state stream: the unbounded job ended after it.
    options = PipelineOptions(runner_args(["--prism_location=/bin/true"]))
    assert options.view_as(PortableOptions).job_server_timeout == JOB_SERVER_TIMEOUT_S >= 365 * 24 * 3600
    assert options.view_as(StandardOptions).runner == "PrismRunner"
    # What a person gives wins, in either spelling Beam takes.
    for given in ("--job_server_timeout=60", "--job-server-timeout=60"):
        assert PipelineOptions(runner_args([given, "--prism_location=/bin/true"])
                               ).view_as(PortableOptions).job_server_timeout == 60
    # Other options keep their defaults: a dashed spelling Beam does not take is no option given.
    assert "--environment_type=LOOPBACK" in runner_args(["--environment-type=DOCKER", "--prism_location=/bin/true"])
    # Prism's splits stay off beside the experiments a person gives, whichever way Prism is named.
    for runner in ("PrismRunner", "prism", "apache_beam.runners.portability.prism_runner.PrismRunner"):
        given = PipelineOptions(runner_args([f"--runner={runner}", "--experiments=use_runner_v2",
                                             "--prism_location=/bin/true"]))
        assert given.view_as(DebugOptions).experiments == ["use_runner_v2", PRISM_NO_SPLITS], runner
    assert PRISM_NO_SPLITS not in " ".join(runner_args(["--runner=FlinkRunner"]))


class _CountPerKey(beam.DoFn):
    """Each key's count in state. The first element of a bundle stalls: no progress between two of Prism's
    progress reports (0.1 s apart at first), where Prism with its splits on splits the bundle."""

    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())

    def start_bundle(self):
        self._stall = True

    def process(self, item, count=beam.DoFn.StateParam(COUNT)):  # noqa: B008 (Beam idiom)
        if self._stall:
            self._stall = False
            time.sleep(3)
        key, _ = item
        count.write((count.read() or 0) + 1)
        yield key, count.read()


def counted_on_prism(options: PipelineOptions, check) -> None:
    """40 elements of one key through `_CountPerKey`; `check(highest count)` must hold."""
    def match(counts):
        [(_, highest)] = counts
        if not check(highest):
            raise BeamAssertException(f"counted {highest} of 40")
    with BeamTestPipeline(options=options) as p:
        counts = (p | beam.Create([("k", i) for i in range(40)]) | beam.ParDo(_CountPerKey())
                  | beam.CombinePerKey(max))
        assert_that(counts, match)


@pytest.mark.slow
def test_a_stateful_step_on_prism_loses_no_update_when_a_bundle_stalls():
    """The job's options keep every update (`PRISM_NO_SPLITS`). Without them Prism 2.77 runs the rest of
    a stalled bundle's key in a second bundle from the state as it was, and one commit overwrites the
    other: that loss is checked too, so a Beam release that fixes it shows here."""
    counted_on_prism(prism(), lambda n: n == 40)
    with_splits = PipelineOptions([a for a in runner_args([]) if PRISM_NO_SPLITS not in a])
    counted_on_prism(with_splits, lambda n: n < 40)


def test_parse_routes_each_event_and_gives_bad_input_a_reason(tmp_path):
    [photo] = make_library(tmp_path, {"ana": [("a", "warm", 1)]})
    messages = [
        message(PHOTO_EVENTS, 0, photo.upload_event()),
        message(PHOTO_EVENTS, 1, photo.delete_event(WHEN)),
        message(CONSENT_EVENTS, 0, toggle_event("ana", "album", "a", False, WHEN)),
        message(PHOTO_EVENTS, 2, key=b"ana", value=b"{not json"),
        message(PHOTO_EVENTS, 3, photo.upload_event(), key=b"ben"),  # routed by another user's key
    ]
    with BeamTestPipeline(options=prism()) as p:
        events = p | beam.Create(messages) | ParseEvents()
        assert_that(events.uploads | "U" >> beam.Map(lambda s: (s.event.photo_id, s.offset)),
                    equal_to([(photo.photo_id, 0)]), label="uploads")
        assert_that(events.deletes | "D" >> beam.Map(lambda s: s.event.photo_id), equal_to([photo.photo_id]),
                    label="deletes")
        assert_that(events.toggles | "T" >> beam.Map(lambda s: (s.event.scope, s.event.enabled)),
                    equal_to([("album", False)]), label="toggles")
        assert_that(events.dead | "X" >> beam.Map(lambda d: (d.offset, d.stage, "JSON" in d.reason or
                                                             "is not the event's user_id" in d.reason)),
                    equal_to([(2, "validate", True), (3, "validate", True)]), label="dead")


def test_prepare_decodes_keeps_only_whitelisted_metadata_and_rejects_a_wrong_checksum(tmp_path):
    good, bad = make_library(tmp_path, {"ana": [("a", "warm", 2)]})
    wrong = bad.upload_event()
    wrong = wrong.model_copy(update={"image": wrong.image.model_copy(update={"sha256": "0" * 64})})
    with BeamTestPipeline(options=prism()) as p:
        photos = p | beam.Create([sourced(good.upload_event(), 0), sourced(wrong, 1)]) | PreparePhotos()
        assert_that(photos.ok | "Ok" >> beam.Map(lambda ph: (ph.source.event.photo_id, ph.features.shape,
                                                             sorted(ph.metadata))),
                    equal_to([(good.photo_id, (len(FEATURE_NAMES),),
                               ["exposure_time_s", "f_number", "flash", "focal_length_mm", "hour_of_day", "iso"])]),
                    label="ok")
        assert_that(photos.dead | "Dead" >> beam.Map(lambda d: (d.offset, "sha256" in d.reason)),
                    equal_to([(1, True)]), label="dead")


@pytest.mark.parametrize("limits", [DecodeLimits(), DecodeLimits(jpeg_device="cpu")], ids=["pillow", "batched"])
def test_prepare_on_threads_equals_decoding_one_by_one_bit_for_bit(tmp_path, limits):
    """Photos decoded on a pool of threads (JPEGs three at a time through the batched decoder, where it
    is on) give exactly what decoding them one after another gives: the same pixels, features and
    metadata, and the same dead letters."""
    photos = make_library(tmp_path, {"ana": [("a", "warm", 4), ("b", "mono", 3)]})
    events = [sourced(ph.upload_event(), i) for i, ph in enumerate(photos)]
    broken = photos[0].upload_event()
    events.append(sourced(broken.model_copy(update={"image": broken.image.model_copy(update={"sha256": "0" * 64})}),
                          len(events)))

    def key(ph) -> tuple:
        return (ph.source.offset, hashlib.sha256(ph.image.tobytes()).hexdigest(), ph.image.size,
                ph.features.tobytes(), sorted(ph.metadata.items()))
    expected_ok, expected_dead = [], []
    for e in events:
        try:
            expected_ok.append(key(prepare_photo(e, limits)))
        except PhotoError as error:
            expected_dead.append((e.offset, str(error)))
    assert len(expected_ok) == 7 and len(expected_dead) == 1
    assert limits.jpeg_device is None or all(batchable_jpeg(photo_bytes(e, limits)[0], limits) for e in events[:7])
    with BeamTestPipeline(options=prism()) as p:
        prepared = p | beam.Create(events) | PreparePhotos(limits, workers=3, jpeg_batch=3)
        assert_that(prepared.ok | "Ok" >> beam.Map(key), equal_to(expected_ok), label="ok")
        assert_that(prepared.dead | "Dead" >> beam.Map(lambda d: (d.offset, d.reason)), equal_to(expected_dead),
                    label="dead")


def test_group_by_user_gathers_a_users_share_of_the_cycle(tmp_path):
    photos = make_library(tmp_path, {"ana": [("a", "warm", 2)], "ben": [("b", "cool", 1)]})
    ana = [p for p in photos if p.user_id == "ana"]
    [ben] = [p for p in photos if p.user_id == "ben"]
    with BeamTestPipeline(options=prism()) as p:
        contributions = p | "C" >> beam.Create([contribution(ph, i) for i, ph in enumerate(photos)])
        deletes = p | "D" >> beam.Create([sourced(ana[0].delete_event(WHEN))])
        toggles = p | "T" >> beam.Create([sourced(toggle_event("ben", "user", None, False, WHEN))])
        batches = (contributions, deletes, toggles) | GroupByUser()
        assert_that(batches | beam.Map(lambda b: (b.user_id, sorted(c.photo_id for c in b.contributions),
                                                  [d.photo_id for d in b.deletes], len(b.toggles))),
                    equal_to([("ana", sorted(p.photo_id for p in ana), [ana[0].photo_id], 0),
                              ("ben", [ben.photo_id], [], 1)]))


def test_the_per_user_update_step_keeps_state_and_withdraws_what_an_opt_out_covers(tmp_path):
    photos = make_library(tmp_path, {"ana": [("beach", "warm", 3), ("office", "cool", 2)]})
    with BeamTestPipeline(options=prism()) as p:
        contributions = p | "C" >> beam.Create([contribution(ph, i) for i, ph in enumerate(photos)])
        no_deletes = p | "D" >> beam.Create([])
        off = p | "T" >> beam.Create([sourced(toggle_event("ana", "album", "office", False, WHEN))])
        basis = style_basis(ClipSpec(), 365.0, DecodeLimits())
        updates = (contributions, no_deletes, off) | UpdateUserStyle(8, len(FEATURE_NAMES), basis, KEY)
        # Whatever order the runner delivers them in, the last version counts the beach photos only,
        # and its facets too: exactly as the rule says (transforms/style.py).
        latest = (updates.versions | beam.Map(lambda v: (v.user_id, v))
                  | beam.CombinePerKey(lambda vs: max(vs, key=lambda v: v.version))
                  | beam.MapTuple(lambda u, v: (u, v.event.photo_count, sum(f.photo_count for f in v.event.facets))))
        assert_that(latest, equal_to([("ana", 3, 3)]))


def test_the_streaming_pipeline_forgets_a_person_and_publishes_their_tombstones(tmp_path, clip):
    [photo] = make_library(tmp_path, {"ana": [("a", "warm", 1)]})
    forget = UserForgotten(event_id="forget-1", user_id="ana", event_time=WHEN)
    late = photo.upload_event(WHEN.replace(year=2025))  # from before the request, arriving after it
    limits = DecodeLimits()
    with BeamTestPipeline(options=prism()) as p:
        messages = p | beam.Create([message(CONSENT_EVENTS, 0, forget), message(PHOTO_EVENTS, 0, late)])
        versions, _, erased, dead = build_streaming(messages, clip, limits, style_basis(clip, 365.0, limits),
                                                    KEY, publish_delay_s=0.1)
        tombstones = (erased | beam.Filter(lambda m: m[2] is not None)
                      | beam.Map(lambda m: (m[0], parse_event(m[0], m[2])))
                      | beam.MapTuple(lambda topic, v: (topic, v.tombstone, [r.event_id for r in v.erasure.requests])))
        assert_that(tombstones, equal_to([(STYLE_VECTORS, True, ["forget-1"])]), label="the tombstone names it")
        assert_that(erased | beam.Filter(lambda m: m[2] is None) | beam.Map(lambda m: m[0]),
                    equal_to([STYLE_VECTORS, STYLE_MANIFESTS]), label="then null tombstones")
        assert_that(versions, equal_to([]), label="the late upload counts nothing")
        assert_that(dead, equal_to([]), label="no dead letter")
