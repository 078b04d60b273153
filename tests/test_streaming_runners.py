"""Every promise on every runner: the streaming pipeline on Prism and the Flink job at parallelism 4,
each with a broker of its own, against the local driver over one messy stream that also holds forget
requests (a person forgotten while their uploads are in flight, and their late upload from before the
request), `library://` photos and photos with faces under masking. Each ends with the same styles,
facets, manifests and style codes as the local driver; every forgotten person is absent from every
store (the audit finds nothing), each receipt verifies and counts what the local driver's counts; the
history writer's Parquet history answers the drift commands as the local driver's does. The Flink job
also survives a SIGKILL and a restore after its Kafka transactions timed out, and a SIGKILL the
instant a checkpoint covering its input completes, with versions still to publish.

Version numbers are not compared: the local driver counts a version per cycle, the streaming runners
per publish, so they number (and withdraw) different versions of the same styles. A person ("kept")
whose style changes once, in two separate steps on every runner, has the same versions everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TEST_BROKER
from helpers import dead_letters, latest_styles, style_differences
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaError
from PIL import Image
from typer.testing import CliRunner

from stylestream.analytics.pseudonyms import load_key, pseudonym
from stylestream.cli.main import app
from stylestream.demo.synthetic import forgotten_for_good, make_library, messy_stream, toggle_event
from stylestream.pipelines.flink_setup import flink_python
from stylestream.pipelines.layout import DataLayout
from stylestream.pipelines.library import library_uri, register_library
from stylestream.pipelines.settings import IngestSettings
from stylestream.privacy.erasure import load_signing_key, verify_receipt
from stylestream.schemas.events import (
    ImageRef,
    PhotoEmbedded,
    PhotoUploaded,
    StyleLearningToggled,
    UserForgotten,
    encode_event,
    parse_event,
)
from stylestream.streams import clients
from stylestream.streams.broker import start_local_broker
from stylestream.streams.topics import (
    CONSENT_EVENTS,
    ERASURE_RECEIPTS,
    PHOTO_EVENTS,
    STYLE_MANIFESTS,
    STYLE_VECTORS,
    ensure_topics,
)
from stylestream.transforms.device import DevicePhoto, contributions
from stylestream.transforms.embed import OpenClipImageHandler

N_EVENTS = 1000  # a messy stream with every kind of event and a few forget requests
T = datetime(2026, 1, 10, tzinfo=UTC)  # when the in-flight person asks to be forgotten
IN_FLIGHT = "fay"  # forgotten while her uploads are in flight
KEPT = "kept"  # one upload, then (in a second step) another: versions 1 and 2 on every runner
GONE, GONE_REQUEST = "gus", "forget-7a1f"  # forgotten once every runner holds his photos; nothing after
ON_DEVICE = "dee"  # her photos analysed on her device (photo_embedded), one computed with other weights, one
# sent again with another file
FLINK_GROUP = "stylestream-flink"  # the Flink job's Kafka source commits its checkpoints' offsets here
COMPARED_KINDS = ("catalogued photo references", "photo contributions (embeddings, features, coarse metadata)",
                  "deleted-photo records", "consent records", "style sums")  # what every runner's state holds
runner = CliRunner(env={"COLUMNS": "300"})

Messages = list[tuple[str, bytes, bytes]]


def message(event) -> tuple[str, bytes, bytes]:
    topic = CONSENT_EVENTS if isinstance(event, UserForgotten | StyleLearningToggled) else PHOTO_EVENTS
    return topic, event.user_id.encode(), encode_event(event)


def reference_to(path: Path, uri: str) -> ImageRef:
    import hashlib

    data = path.read_bytes()
    return ImageRef(uri=uri, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@dataclass(frozen=True)
class Stream:
    first: Messages  # the messy stream and the special people
    second: Messages  # the kept person's second upload, sent once the first is done
    library: Path  # the folder behind the library:// photos (registered in each deployment's state)
    forget_requests: dict[str, str]  # request id -> user id
    gone: set[str]  # people forgotten who sent nothing new after: nothing of them may be left anywhere


def build_stream(root: Path, clip) -> Stream:
    messy = messy_stream(root / "messy", N_EVENTS, users=30, seed=14, forget_share=0.004)
    photos = make_library(root / "library", {"lib": [("trip", "warm", 2)], KEPT: [("k", "cool", 2)],
                                             IN_FLIGHT: [("f", "green", 5)],
                                             GONE: [("g1", "mono", 2), ("g2", "warm", 2)]})
    by_user = {u: [p for p in photos if p.user_id == u] for u in ("lib", KEPT, IN_FLIGHT, GONE)}
    device = IngestSettings(root / "device-settings", clip_pretrained=clip.pretrained, mask_faces=True)
    on_device = device_events(make_library(root / "device", {ON_DEVICE: [("d", "green", 3)]}), device)
    on_device.append(on_device[0].model_copy(update={"photo_id": "dee-other", "event_id": "dee-other", "basis": (
        on_device[0].basis.model_copy(update={"weights": "sha256:" + "0" * 64}))}))
    # One of her photos again with another file, after it (her events share a partition): refused
    on_device.append(on_device[0].model_copy(update={"event_id": "dee-changed", "sha256": "f" * 64}))
    library = root / "library"
    lib_id = register_library(root / "scratch-registry.json", library)  # the id any registry gives this folder
    lib_uploads = [p.upload_event().model_copy(update={"image": reference_to(
        p.path, library_uri(lib_id, str(p.path.relative_to(library))))}) for p in by_user["lib"]]
    faces = []
    from skimage import data

    portrait = Image.fromarray(data.astronaut())
    for i, img in enumerate([portrait, portrait.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]):
        path = root / "faces" / f"face-{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=90)
        when = T - timedelta(days=30 + i)
        faces.append(PhotoUploaded(event_id=f"up-face-{i}", user_id="face", event_time=when, photo_id=f"face-p{i}",
                                   album_id="portraits", taken_at=when,
                                   image=reference_to(path, path.resolve().as_uri())))
    fay = by_user[IN_FLIGHT]
    request = UserForgotten(event_id="forget-3c9e", user_id=IN_FLIGHT, event_time=T)
    in_flight = [fay[0].upload_event(T - timedelta(days=2)), fay[1].upload_event(T - timedelta(days=1)), request,
                 fay[2].upload_event(T - timedelta(hours=12)),  # sent before the request, arriving after it
                 fay[3].upload_event(T - timedelta(days=40))]  # a late upload from long before
    gus = [*(p.upload_event(T - timedelta(days=20 - i)) for i, p in enumerate(by_user[GONE])),
           toggle_event(GONE, "album", "g2", False, T - timedelta(days=5))]
    kept = by_user[KEPT]
    forgets = {parse_event(CONSENT_EVENTS, v).event_id: k.decode() for t, k, v in messy
               if t == CONSENT_EVENTS and b"user_forgotten" in v}
    first = messy + [message(e) for e in [*lib_uploads, *faces, *in_flight, *gus, *on_device,
                                          kept[0].upload_event(T)]]
    # Gus asks to be forgotten once every runner holds his photos (and sends nothing after).
    # Fay's upload after her request starts her style afresh (sent once the request is in everywhere: a
    # runner reading photo-events ahead of consent-events would otherwise erase it with the request).
    second = [message(e) for e in [kept[1].upload_event(T + timedelta(days=5)),
                                   UserForgotten(event_id=GONE_REQUEST, user_id=GONE, event_time=T),
                                   fay[4].upload_event(T + timedelta(days=1))]]
    return Stream(first, second, library, forgets | {"forget-3c9e": IN_FLIGHT, GONE_REQUEST: GONE},
                  forgotten_for_good(first + second))


@dataclass
class Outcome:
    """What a deployment ends with."""

    styles_first: dict  # after the first part of the stream
    styles: dict
    dead: dict
    manifests: dict[str, tuple[str, list]]  # user -> (style code, [(photo id, sha256)])
    receipts: dict[str, dict]  # request id -> deleted counts (state), verified
    drift: dict  # `drift user KEPT` and `drift timeline KEPT` as JSON
    last_history: dict[str, tuple[int, list]]  # pseudonym -> (photo count, embedding) of the latest row
    audit: dict[str, tuple[int, str]]  # forgotten user -> (exit code, output)


def latest_manifests(bs: str) -> dict[str, tuple[str, list]]:
    out: dict = {}
    for m in clients.read_all(bs, STYLE_MANIFESTS):
        if m.value is None:
            out.pop(m.key.decode(), None)
            continue
        v = parse_event(STYLE_MANIFESTS, m.value)
        if v.version >= out.get(v.user_id, (0,))[0]:
            out[v.user_id] = (v.version, v.style_code, [(p.photo_id, p.sha256) for p in v.photos])
    return {u: (code, photos) for u, (_, code, photos) in out.items()}


def receipts(bs: str, data_dir: Path) -> dict[str, dict]:
    """Each request's receipt, checked against the deployment's key; one message per request."""
    public = load_signing_key(DataLayout(data_dir).state.root).public_key()
    messages = clients.read_all(bs, ERASURE_RECEIPTS)
    counts = Counter(m.key for m in messages)
    assert all(n == 1 for n in counts.values()), counts
    out = {}
    for m in messages:
        receipt = parse_event(ERASURE_RECEIPTS, m.value)
        assert verify_receipt(receipt, public), receipt.request_event_id
        out[receipt.request_event_id] = receipt.deleted
    return out


def cli_json(*args: str) -> list:
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def last_history(data_dir: Path, users: set[str]) -> dict[str, tuple[int, list]]:
    """Each person's latest history row, by user id (each deployment has its own pseudonym key)."""
    state = DataLayout(data_dir).state
    key = load_key(state.analytics_key)
    named = {pseudonym(u, key): u for u in users}
    rows = pq.read_table(state.history).to_pylist() if state.history.exists() else []
    assert len({(r["user_id"], r["version"]) for r in rows}) == len(rows), "a version twice in the history"
    last: dict = {}
    for r in sorted(rows, key=lambda r: r["version"]):
        last[named[r["user_id"]]] = (r["photo_count"], r["embedding"])
    return last


def outcome(bs: str, data_dir: Path, styles_first: dict, stream: Stream) -> Outcome:
    history = DataLayout(data_dir).state.history
    audits = {}
    for user in sorted(stream.gone):
        result = runner.invoke(app, ["audit", "--user", user, "-b", bs, "--data-dir", str(data_dir)])
        audits[user] = (result.exit_code, result.output)
    return Outcome(styles_first, latest_styles(bs), dead_letters(bs), latest_manifests(bs), receipts(bs, data_dir),
                   {"user": cli_json("drift", "user", KEPT, "--history", str(history)),
                    "timeline": cli_json("drift", "timeline", KEPT, "--history", str(history))},
                   last_history(data_dir, {k.decode() for _, k, _ in stream.first + stream.second}), audits)


def deployment(root: Path, stream: Stream) -> Path:
    """A data folder whose registry knows the library (as a backfill would have registered it)."""
    settings = IngestSettings(root, mask_faces=True)
    register_library(settings.state.libraries, stream.library)
    return root


def device_events(photos, settings: IngestSettings) -> list[PhotoEmbedded]:
    """The photos as a device sends them, computed as `stylestream device sync` does."""
    handler = OpenClipImageHandler(settings.clip, device="cpu")
    found = [DevicePhoto(p.photo_id, p.album_id, p.path.read_bytes(), p.taken_at) for p in photos]
    return [c.as_event(photos[0].user_id, T) for c in contributions(found, settings.clip, settings.limits, handler,
                                                                  handler.load_model())]


@pytest.fixture(scope="module")
def stream(tmp_path_factory, clip) -> Stream:
    return build_stream(tmp_path_factory.mktemp("stream"), clip)


@pytest.fixture(scope="module")
def local(stream, clip, tmp_path_factory) -> Outcome:
    """The local driver's answer, the reference."""
    from stylestream.pipelines.ingest import IngestConfig, Ingestor

    root = tmp_path_factory.mktemp("local")
    data = deployment(root / "data", stream)
    settings = IngestSettings(data, clip_pretrained=clip.pretrained, mask_faces=True)
    with start_local_broker(TEST_BROKER, root / "kafka") as b:
        ensure_topics(b.bootstrap_servers)
        with Ingestor(IngestConfig(b.bootstrap_servers, settings.state.root, settings.clip,
                                   limits=settings.limits)) as ingestor:
            clients.send_all(b.bootstrap_servers, stream.first)
            ingestor.run_until_caught_up()
            first = latest_styles(b.bootstrap_servers)
            clients.send_all(b.bootstrap_servers, stream.second)
            ingestor.run_until_caught_up()
        got = outcome(b.bootstrap_servers, data, first, stream)
    assert len(got.styles) >= 12 and len(got.dead) >= 30  # the stream reaches most users, and has bad input
    assert IN_FLIGHT not in got.styles_first  # her in-flight and late uploads count for nothing
    assert got.styles[ON_DEVICE].photo_count == 3  # her device's contributions count; the other weights' not
    assert sum(stage == "conflict" for stage, _ in got.dead.values()) == 1  # ...nor the other file
    assert got.styles[IN_FLIGHT].photo_count == 1  # only what came after the request
    assert len(got.receipts) == len(stream.forget_requests) >= 5 and stream.gone
    assert {u: code for u, (code, _) in got.audit.items()} == {u: 0 for u in stream.gone}, got.audit
    return got


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: the Flink job's JVM and Python workers go down with it.
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(job: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    try:
        os.killpg(job.pid, sig)
    except ProcessLookupError:  # the job and all its children ended already
        pass
    return job.wait(60)


def wait_for(bs: str, want: dict, job: subprocess.Popen, deadline_s: float, want_dead: dict | None = None) -> dict:
    """Polls the job's styles until they equal `want` (and the dead letters `want_dead`), or the deadline."""
    deadline = time.monotonic() + deadline_s
    got = {}
    while time.monotonic() < deadline and job.poll() is None:
        time.sleep(3)
        got = latest_styles(bs)
        if not style_differences(want, got) and (want_dead is None or dead_letters(bs) == want_dead):
            break
    return got


def streamed(cmd: list[str], root: Path, stream: Stream, local: Outcome, deadline_s: float) -> Outcome:
    """The stream through a streaming runner's command, in the same two steps; then the history writer."""
    data = deployment(root / "data", stream)
    log = root / "job.log"
    with start_local_broker(TEST_BROKER, root / "kafka") as b:
        bs = b.bootstrap_servers
        ensure_topics(bs)
        clients.send_all(bs, stream.first)
        job = start([*cmd, "--bootstrap-servers", bs, "--data-dir", str(data)], log)
        try:
            first = wait_for(bs, local.styles_first, job, deadline_s, local.dead)
            assert not (missing := style_differences(local.styles_first, first)), (
                f"after {deadline_s} s the job's styles still differ from the local driver's: {missing[:5]}\n"
                f"{log.read_text()[-5000:]}")
            clients.send_all(bs, stream.second)
            wait_for(bs, local.styles, job, 120)
            assert job.poll() is None, f"the job ended by itself (exit {job.returncode}):\n{log.read_text()[-5000:]}"
        finally:
            stop(job, signal.SIGKILL)
        follow = runner.invoke(app, ["history", "follow", "--until-caught-up", "-b", bs, "--data-dir", str(data)])
        assert follow.exit_code == 0, follow.output
        return outcome(bs, data, first, stream)


def same_as_local(got: Outcome, local: Outcome, log: Path) -> None:
    tail = log.read_text()[-3000:]
    assert style_differences(local.styles, got.styles) == [], tail
    assert got.dead == local.dead
    # Style codes and the photos that count, with their sha256 (a person with no photo counted may have
    # a manifest on one side only, as for the styles)
    assert {u: m for u, m in got.manifests.items() if m[1]} == {u: m for u, m in local.manifests.items() if m[1]}
    # Every forget request: one verified receipt (`receipts`), naming every store. Gus's, whose photos
    # every runner had stored before his request, counts what the local driver's counts. (Where a
    # request shares the local driver's cycle with the person's earlier events, the driver never
    # stored those, while a streaming runner had, and counts them.)
    assert set(got.receipts) == set(local.receipts)
    assert all(set(deleted) >= {"state", "history", "release ledger", "backfill"} for deleted in got.receipts.values())
    want = {k: n for k, n in local.receipts[GONE_REQUEST]["state"].items() if k in COMPARED_KINDS}
    assert want and {k: n for k, n in got.receipts[GONE_REQUEST]["state"].items() if k in COMPARED_KINDS} == want
    assert {u: code for u, (code, _) in got.audit.items()} == {u: 0 for u in got.audit}, got.audit
    # The history: each person's latest row as the local driver's (one with no photo counted may have
    # rows on one side only); the kept person's drift the same.
    def counted(rows: dict) -> dict:
        return {u: row for u, row in rows.items() if row[0]}
    assert set(counted(got.last_history)) == set(counted(local.last_history))
    for user, (count, embedding) in counted(local.last_history).items():
        assert got.last_history[user][0] == count and np.allclose(got.last_history[user][1], embedding, atol=1e-6)
    assert same_numbers(got.drift, local.drift, skip={"updated_at", "from_time", "to_time"}), (got.drift, local.drift)


def same_numbers(a, b, skip: set[str]) -> bool:
    """Equal JSON, numbers within 1e-6, keys in `skip` ignored."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k], skip) for k in a if k not in skip)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_numbers(x, y, skip) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int):
        return abs(a - b) <= 1e-6
    return a == b


def needs_kafka() -> None:
    if TEST_BROKER.value != "kafka":
        pytest.skip("needs Apache Kafka (STYLESTREAM_TEST_BROKER=kafka): the Flink job writes in Kafka "
                    "transactions, which Tansu does not have")


@pytest.mark.slow
# Under load this failed in about one run of three (two of three with a core kept busy beside it): the
# job published one person's style without their earlier events, an opt-out among them, because Prism
# had split a stalled bundle of the per-user step and run that person in two bundles at once. The job
# now turns Prism's splits off (`streaming.PRISM_NO_SPLITS`; test_transforms.py shows the lost update).
def test_prism_keeps_every_promise_of_the_local_driver(stream, local, tmp_path):
    # The default model: the tiny CLIP's checkpoint under DATA_DIR/models, the same weights id as the
    # local driver's (so the same style codes).
    got = streamed([sys.executable, "-m", "stylestream.pipelines.streaming", "--mask-faces"], tmp_path, stream,
                   local, 240)
    same_as_local(got, local, tmp_path / "job.log")


def flink_job(clip, *extra: str) -> list[str]:
    return [str(flink_python()), "-m", "stylestream.pipelines.flink_job", "--clip-pretrained", clip.pretrained,
            "--mask-faces", "--parallelism", "4", "--checkpointing-interval-ms", "2000", *extra]


@pytest.mark.slow
def test_the_flink_job_at_parallelism_4_keeps_every_promise_of_the_local_driver(stream, local, clip, tmp_path):
    needs_kafka()
    got = streamed(flink_job(clip, "--metrics-port", str(free_port())), tmp_path, stream, local, 480)
    same_as_local(got, local, tmp_path / "job.log")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def published_versions(bs: str) -> dict[tuple[str, int], set]:
    """Every committed style-vector message, by (user, version): the contents published under it."""
    out: dict[tuple[str, int], set] = {}
    for m in clients.read_all(bs, STYLE_VECTORS):
        if m.value is not None:
            v = parse_event(STYLE_VECTORS, m.value)
            out.setdefault((v.user_id, v.version), set()).add((v.photo_count, tuple(v.embedding)))
    return out


def metric(port: int, name: str) -> float:
    """The sum of a metric over its series on the job's Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in io.StringIO(text)
               if line.startswith(name) and not line.startswith("#"))


def wait_until_checkpointed(bs: str, job: subprocess.Popen, deadline_s: float) -> None:
    """Returns the instant the Flink job's newest complete checkpoint covers every message now on its
    input topics (its Kafka source commits a checkpoint's offsets when the checkpoint completes)."""
    want: dict[TopicPartition, int] = {}
    for topic in (PHOTO_EVENTS, CONSENT_EVENTS):
        for m in clients.read_all(bs, topic):
            tp = TopicPartition(topic, m.partition)
            want[tp] = max(want.get(tp, 0), m.offset + 1)
    admin = KafkaAdminClient(bootstrap_servers=bs)
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and job.poll() is None:
            with contextlib.suppress(KafkaError):  # the group's coordinator may still be loading
                committed = admin.list_group_offsets(FLINK_GROUP).get(FLINK_GROUP, {})
                if all(tp in committed and committed[tp].offset >= end for tp, end in want.items()):
                    return
            time.sleep(0.02)
    finally:
        admin.close()
    raise AssertionError(f"no checkpoint of the job covered its input within {deadline_s} s")


@pytest.mark.slow
# Once in three runs on a loaded 2-core machine, the restored job's Python worker failed a state read
# ("Unknown process bundle instruction id", PyFlink's state client, after "Multiplexer hanging up")
# and published nothing more; the cause is not found. One rerun, which pytest's summary reports.
@pytest.mark.flaky(reruns=1)
def test_flink_killed_mid_stream_resumes_from_its_last_checkpoint(stream, local, clip, tmp_path):
    needs_kafka()
    data = deployment(tmp_path / "data", stream)
    log = tmp_path / "job.log"
    port = free_port()
    timeout_s = 10  # the job stays down longer than this: the broker aborts its open transactions
    # A publish delay long enough that step 3's kill comes before its versions are published.
    cmd = flink_job(clip, "--metrics-port", str(port), "--transaction-timeout-s", str(timeout_s),
                    "--confirm-after-s", "8", "--publish-delay-s", "15")
    with start_local_broker(TEST_BROKER, tmp_path / "kafka") as b:
        bs = b.bootstrap_servers
        ensure_topics(bs)
        # 1. Half the stream until its versions are out (a checkpoint has completed); then the rest,
        #    and SIGKILL the job while it works on it.
        half = len(stream.first) // 2
        clients.send_all(bs, stream.first[:half])
        job = start([*cmd, "--bootstrap-servers", bs, "--data-dir", str(data)], log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not latest_styles(bs) and job.poll() is None:
            time.sleep(1)
        assert metric(port, "flink_taskmanager_job_task_operator_stylestream_events") > 0  # the job's own metrics
        clients.send_all(bs, stream.first[half:])
        time.sleep(3)
        stop(job, signal.SIGKILL)
        before_kill = latest_styles(bs)
        assert before_kill and style_differences(local.styles_first, before_kill), "killed too late"
        time.sleep(timeout_s + 5)
        # 2. Restored from its newest checkpoint after its transactions were aborted, it finishes the
        #    stream: every person's latest version is on the topic.
        job = start([*cmd, "--bootstrap-servers", bs, "--data-dir", str(data), "--restore", "latest"], log)
        try:
            got = wait_for(bs, local.styles_first, job, 480)
            assert style_differences(local.styles_first, got) == [], log.read_text()[-3000:]
            # 3. The second step's three events, and SIGKILL the job the instant the checkpoint that
            #    covers them completes, their versions still to publish. Restored from that checkpoint
            #    (its sources past them), it publishes them.
            clients.send_all(bs, stream.second)
            wait_until_checkpointed(bs, job, 120)
        finally:
            stop(job, signal.SIGKILL)
        assert style_differences(local.styles, latest_styles(bs)), "killed too late"
        job = start([*cmd, "--bootstrap-servers", bs, "--data-dir", str(data), "--restore", "latest"], log)
        try:
            got = wait_for(bs, local.styles, job, 240)
            versions = published_versions(bs)
            dead = dead_letters(bs)
        finally:
            stop(job, signal.SIGKILL)
    assert log.read_text().count("restoring from") == 2
    assert style_differences(local.styles, got) == [], log.read_text()[-3000:]
    # Every dead letter once, with its reason (the second half's offsets differ from the local broker's:
    # the job's re-published uploads went in between), and no version published twice with different
    # content (what was published again after a restore is the same bytes).
    assert Counter((t, p, why) for (t, p, _), why in dead.items()) == Counter(
        (t, p, why) for (t, p, _), why in local.dead.items())
    assert all(len(contents) == 1 for contents in versions.values()), [k for k, c in versions.items() if len(c) > 1]


def test_prism_refuses_to_restart_over_versions_an_earlier_run_published(broker, tmp_path):
    """Prism keeps its state in memory: started again, it would number versions from 1 under those
    serving keeps. It says so and exits instead."""
    bs = broker.bootstrap_servers
    clients.send_all(bs, [(STYLE_VECTORS, b"ana", b'{"an": "earlier version"}')])
    done = subprocess.run([sys.executable, "-m", "stylestream.pipelines.streaming", "--bootstrap-servers", bs,
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "already holds 1 messages" in done.stderr and "Flink job" in done.stderr, done.stderr
