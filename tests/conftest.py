"""Shared fixtures: a real broker per test, tiny real models built once per session.

STYLESTREAM_TEST_BROKER chooses the broker: `kafka` (Apache Kafka, what CI runs the whole suite on),
`tansu` (CI runs the tests marked `smoke` on it too), or `auto` (the default: Kafka where Java is).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for a model hub
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stylestream.models.clip import ClipSpec, embedding_dim, ensure_tiny_clip
from stylestream.models.diffusion import DiffusionSpec
from stylestream.models.random_models import ensure_tiny_diffusion
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.broker import Engine, LocalBroker, choose_engine, start_local_broker
from stylestream.streams.topics import ensure_topics

if TYPE_CHECKING:
    from stylestream.api.config import ApiConfig
    from stylestream.api.system import DemoIssuer

# Clients of brokers that tests have stopped log reconnect attempts until the process exits.
logging.getLogger("kafka").setLevel(logging.CRITICAL)


TEST_BROKER, _WHY = choose_engine(os.environ.get("STYLESTREAM_TEST_BROKER", Engine.auto))


def pytest_report_header() -> str:
    return f"broker: {TEST_BROKER.value} ({_WHY}; STYLESTREAM_TEST_BROKER=kafka|tansu|auto)"


@pytest.fixture
def broker_engine() -> str:
    """The broker engine tests run on, for the ones that start their own (benchmarks, restarts)."""
    return TEST_BROKER.value


@pytest.fixture
def broker(tmp_path) -> LocalBroker:
    """A fresh broker with the stylestream topics, so no test sees another's (Kafka starts in ~4 s with
    its log under tmp_path/kafka, Tansu in ~10 ms)."""
    b = start_local_broker(TEST_BROKER, tmp_path / "kafka")
    ensure_topics(b.bootstrap_servers)
    yield b
    b.process.kill()  # its log goes with tmp_path: no clean shutdown to wait for (about a second)
    b.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def clip(models_dir) -> ClipSpec:
    return ensure_tiny_clip(models_dir)


@pytest.fixture(scope="session")
def diffusion(models_dir, clip) -> DiffusionSpec:
    return ensure_tiny_diffusion(models_dir, embedding_dim(clip) + len(FEATURE_NAMES))


@pytest.fixture
def make_ingestor(broker, clip, tmp_path):
    """Ingestor factory; each state directory is a separate, from-scratch state."""
    made = []

    def make(state: str = "state", **kw) -> Ingestor:
        ing = Ingestor(IngestConfig(broker.bootstrap_servers, tmp_path / state, clip, **kw))
        made.append(ing)
        return ing

    yield make
    for ing in made:
        ing.close()


# People of the running system the API tests share: Ana's page is driven in the browser, Ben and Cleo
# show who may see what, Eve asks to be forgotten; "fuzz" (no photos) is the fuzzer's person.
API_LIBRARY = {
    "ana": [("beach", "warm", 4), ("office", "cool", 4)],
    "ben": [("walks", "cool", 4)],
    "cleo": [("street", "mono", 4)],
    "eve": [("garden", "green", 3)],
}


@dataclass
class ApiSystem:
    url: str
    bootstrap_servers: str
    issuer: DemoIssuer
    root: Path
    api: ApiConfig

    def token(self, user_id: str, **lifetime) -> str:
        return self.issuer.token(user_id, timedelta(**lifetime) if lifetime else timedelta(hours=1))


@pytest.fixture(scope="session")
def api_system(tmp_path_factory, clip, diffusion) -> ApiSystem:
    """Broker, ingestion following, a serving worker and the API, running for every test that asks;
    each person's photos ingested before the first test."""
    from stylestream.api.config import ApiConfig
    from stylestream.api.system import DemoIssuer, running_services
    from stylestream.demo.synthetic import make_library
    from stylestream.pipelines.layout import DataLayout
    from stylestream.schemas.events import encode_event
    from stylestream.serving.generator import StyleGenerator
    from stylestream.serving.worker import ServeConfig
    from stylestream.streams import clients
    from stylestream.streams.topics import PHOTO_EVENTS

    root = tmp_path_factory.mktemp("api-system")
    broker = start_local_broker(TEST_BROKER, root / "kafka")
    bs = broker.bootstrap_servers
    ensure_topics(bs)
    photos = make_library(root / "library", API_LIBRARY)
    clients.send_all(bs, [(PHOTO_EVENTS, p.user_id.encode(), encode_event(p.upload_event())) for p in photos])
    layout = DataLayout(root)
    ingest = IngestConfig(bs, layout.state.root, clip)
    with Ingestor(ingest) as ingestor:
        ingestor.run_until_caught_up()
    issuer = DemoIssuer(root / "issuer")
    api = ApiConfig(bs, root, issuer.verifier(), grant_images_rate="10/minute")  # reached by a test
    try:
        with running_services(api, ingest, ServeConfig(bs, str(layout.images)),
                              StyleGenerator(diffusion, clip)) as server:
            system = ApiSystem(server.url, bs, issuer, root, api)
            _wait_for_styles(system, [u for u in API_LIBRARY])
            yield system
    finally:
        broker.stop()


def _wait_for_styles(system: ApiSystem, users: list[str], timeout_s: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    for user in users:
        while requests.get(f"{system.url}/v1/me/style", headers={
                "Authorization": f"Bearer {system.token(user)}"}, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, f"the API never showed {user}'s style"
            time.sleep(0.2)
