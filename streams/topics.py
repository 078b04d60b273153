"""Topic names, their partitioning, and creating them."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

PHOTO_EVENTS = "photo-events"
CONSENT_EVENTS = "consent-events"
GENERATION_REQUESTS = "generation-requests"
GENERATION_RESULTS = "generation-results"
STYLE_VECTORS = "style-vectors"

INGEST_TOPICS = (PHOTO_EVENTS, CONSENT_EVENTS)
DEFAULT_PARTITIONS = 4  # every topic is keyed by user_id, so a user's events stay in order on one partition


def dlq(topic: str) -> str:
    """Dead-letter topic for `topic`: bad input with its original bytes, source offset and reason."""
    return f"{topic}.dlq"


ALL_TOPICS = (
    PHOTO_EVENTS, CONSENT_EVENTS, GENERATION_REQUESTS, GENERATION_RESULTS, STYLE_VECTORS,
    dlq(PHOTO_EVENTS), dlq(CONSENT_EVENTS), dlq(GENERATION_REQUESTS),
)


def ensure_topics(bootstrap_servers: str, partitions: int = DEFAULT_PARTITIONS,
                  topics: tuple[str, ...] = ALL_TOPICS) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process
        return missing
    finally:
        admin.close()
