"""Shared fixtures: a real Kafka-protocol broker per test, tiny real models built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for a model hub
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import logging
from pathlib import Path

import pytest

from stylestream.models.clip import ClipSpec, embedding_dim, ensure_tiny_clip
from stylestream.models.diffusion import DiffusionSpec, ensure_tiny_diffusion
from stylestream.pipelines.ingest import IngestConfig, Ingestor
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.streams.broker import LocalBroker, start_broker
from stylestream.streams.topics import ensure_topics

# Clients of brokers that tests have stopped log reconnect attempts until the process exits.
logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture
def broker() -> LocalBroker:
    """A fresh Tansu broker (starts in ~10 ms), so no test sees another's topics."""
    b = start_broker()
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
