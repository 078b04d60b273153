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
from pathlib import Path

import pytest

from stylestream.models.clip import ClipSpec, embedding_dim, ensure_tiny_clip
from stylestream.models.diffusion import DiffusionSpec
from stylestream.models.random_models import ensure_tiny_diffusion
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.broker import Engine, LocalBroker, choose_engine, start_local_broker
from stylestream.streams.topics import ensure_topics

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
    """A fresh broker with the stylestream topics, so no test sees another's (Kafka starts in ~3 s with
    its log under tmp_path/kafka, Tansu in ~10 ms)."""
    b = start_local_broker(TEST_BROKER, tmp_path / "kafka")
    ensure_topics(b.bootstrap_servers)
    yield b
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
