"""Topic names, their partitioning, and creating them."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import TopicAlreadyExistsError

PHOTO_EVENTS = "photo-events"
CONSENT_EVENTS = "consent-events"
GENERATION_REQUESTS = "generation-requests"
GENERATION_RESULTS = "generation-results"
STYLE_VECTORS = "style-vectors"
STYLE_MANIFESTS = "style-manifests"
ERASURE_RECEIPTS = "erasure-receipts"
# The local driver's "cycle N is out" markers, keyed by its state's transactional id and written in the
# same Kafka transaction as the cycle's outputs: a restart reads them so as never to publish a cycle twice.
INGEST_COMMITS = "ingest-commits"

INGEST_TOPICS = (PHOTO_EVENTS, CONSENT_EVENTS)
DEFAULT_PARTITIONS = 4  # every topic is keyed by user_id, so a user's events stay in order on one partition


def dlq(topic: str) -> str:
    """Dead-letter topic for `topic`: bad input with its original bytes, source offset and reason."""
    return f"{topic}.dlq"


DLQ_SOURCES = (PHOTO_EVENTS, CONSENT_EVENTS, GENERATION_REQUESTS)  # the topics whose bad input is kept
ALL_TOPICS = (
    PHOTO_EVENTS, CONSENT_EVENTS, GENERATION_REQUESTS, GENERATION_RESULTS, STYLE_VECTORS, STYLE_MANIFESTS,
    ERASURE_RECEIPTS, INGEST_COMMITS, *(dlq(t) for t in DLQ_SOURCES),
)
# The compacted topics the project writes, keyed by user: forgetting a person writes a null-value
# tombstone for their key on each, and compaction then removes every earlier value of theirs (within
# max.compaction.lag.ms, the tombstone itself delete.retention.ms later). On the project's other
# topics (results, dead letters) a person's messages go with the topic's retention.
ERASABLE_TOPICS = (STYLE_VECTORS, STYLE_MANIFESTS)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # style-manifests' limit: a manifest lists every photo that counts
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
FOREVER = "-1"
# Per-topic settings for topics this module creates (an existing cluster's own settings are left alone).
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    # Ingestion commits its offsets with its state; a week covers any outage it should catch up from.
    PHOTO_EVENTS: {"retention.ms": str(7 * DAY_MS)},
    # An opt-out must outlive any rebuild of ingestion state from the topic, so it is never dropped.
    CONSENT_EVENTS: {"retention.ms": FOREVER},
    GENERATION_REQUESTS: {"retention.ms": str(DAY_MS)},
    GENERATION_RESULTS: {"retention.ms": str(7 * DAY_MS)},
    # Latest vector per user (the key): a new serving worker reads one value per user, not the whole
    # history. A superseded version stays pinnable for at least an hour and is gone within a day (with
    # any vector that counted a withdrawn photo); an erasure tombstone stays a day for readers to see.
    STYLE_VECTORS: {"cleanup.policy": "compact", "min.compaction.lag.ms": str(HOUR_MS),
                    "max.compaction.lag.ms": str(DAY_MS), "delete.retention.ms": str(DAY_MS)},
    # As style-vectors: the latest manifest per user; one lists every photo that counts, so up to 8 MB.
    STYLE_MANIFESTS: {"cleanup.policy": "compact", "min.compaction.lag.ms": str(HOUR_MS),
                      "max.compaction.lag.ms": str(DAY_MS), "delete.retention.ms": str(DAY_MS),
                      "max.message.bytes": str(MAX_MESSAGE_BYTES)},
    # Receipts hold no personal data and are the service's proof of erasure: kept.
    ERASURE_RECEIPTS: {"retention.ms": FOREVER},
    # One marker per state (the key) is all a restart needs: the latest.
    INGEST_COMMITS: {"cleanup.policy": "compact"},
    **{dlq(t): {"retention.ms": str(14 * DAY_MS)} for t in DLQ_SOURCES},
}


def ensure_topics(bootstrap_servers: str, partitions: int = DEFAULT_PARTITIONS,
                  topics: tuple[str, ...] = ALL_TOPICS) -> list[str]:
    """Create the topics that do not exist yet, replicated as the broker's default says (a cluster's:
    every node; one node's: 1); returns the ones created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            replicas = int(broker_config(bootstrap_servers).get("default.replication.factor", 1))
            try:
                admin.create_topics([NewTopic(t, partitions, replicas, topic_configs=TOPIC_CONFIGS.get(t, {}))
                                     for t in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process
        return missing
    finally:
        admin.close()


def broker_config(bootstrap_servers: str) -> dict[str, str]:
    """One broker's settings as it reports them (its own and Kafka's defaults); empty where a broker
    does not describe them (Tansu)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        live = [b for b in admin.describe_cluster()["brokers"] if not b.get("is_fenced")]  # a dead node is fenced
        broker = str(live[0]["broker_id"])
        found = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, broker)], config_filter="all")
    except Exception:  # an old or partial broker (Tansu): callers fall back to Kafka's defaults
        return {}
    finally:
        admin.close()
    return {k: v["value"] for k, v in found.get("broker", {}).get(broker, {}).items() if v.get("value") is not None}
