"""Forgetting a person: the messages that erase them from the topics, and the signed erasure receipt.

Ingestion deletes the person's state in the commit that reads their `user_forgotten` request (the
local driver's DuckDB, pipelines/store.py; a streaming runner's keyed state, pipelines/user_state.py)
and publishes their tombstones, the first naming the requests and what the state deleted. Then what
lies beside the state goes (pipelines/forgetting.py: history rows, release ledger, backfill progress
and library registrations), by the local driver after its cycle or by the history writer on reading
the tombstone. Only then is what was deleted counted in a receipt, signed with the service's Ed25519
key (`state/erasure-signing.key`) and published on erasure-receipts under the request's event id.
Anyone with the public key (`stylestream receipt public-key`) can check a receipt (`stylestream
receipt verify`).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stylestream.analytics.pseudonyms import subject  # noqa: F401  (erasure.subject: who was forgotten)
from stylestream.keyfiles import create_once, new_ed25519_pem
from stylestream.pipelines.layout import StateLayout
from stylestream.schemas.events import ErasureNotice, ErasureReceipt, StyleVectorUpdated, encode_event
from stylestream.streams.topics import (
    DLQ_SOURCES,
    ERASABLE_TOPICS,
    GENERATION_RESULTS,
    STYLE_VECTORS,
    TOPIC_CONFIGS,
    dlq,
)
from stylestream.transforms.manifest import canonical_json

# What a receipt calls each kind of record ingestion's state holds of a person (by the local driver's
# table; a streaming runner's keyed state counts the same kinds, and keeps no versions).
STATE_KINDS = {
    "photos": "catalogued photo references",
    "contributions": "photo contributions (embeddings, features, coarse metadata)",
    "style_versions": "style versions",
    "user_stats": "style sums",
    "consent": "consent records",
    "tombstones": "deleted-photo records",
    "redactions": "withdrawal records",
}
# Compaction removes a person's earlier values on the erasable topics within max.compaction.lag.ms of
# the tombstone, and the tombstones themselves delete.retention.ms later (streams/topics.py).
COMPACTED_WITHIN = timedelta(milliseconds=int(TOPIC_CONFIGS[STYLE_VECTORS]["max.compaction.lag.ms"]))
TOMBSTONE_KEPT = timedelta(milliseconds=int(TOPIC_CONFIGS[STYLE_VECTORS]["delete.retention.ms"]))
RESULTS_KEPT_MS = int(TOPIC_CONFIGS[GENERATION_RESULTS]["retention.ms"])
DEAD_LETTERS_KEPT_MS = max(int(TOPIC_CONFIGS[dlq(t)]["retention.ms"]) for t in DLQ_SOURCES)


def load_or_create_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The service's receipt-signing key, created on first use (readable by its owner only)."""
    create_once(StateLayout(state_dir).signing_key, new_ed25519_pem())
    return load_signing_key(state_dir)


def load_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The existing receipt-signing key of a state (an error if there is none: never a new one)."""
    return load_signing_key_file(StateLayout(state_dir).signing_key)


def load_signing_key_file(path: Path) -> Ed25519PrivateKey:
    """The receipt-signing key in this file (an error if there is none: never a new one)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"no receipt-signing key at {path}: give the state's --data-dir, or the service's "
                                "public key with --public-key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def _signed_bytes(receipt: ErasureReceipt) -> bytes:
    return canonical_json(receipt.model_dump(mode="json", exclude={"signature"}))


def signed_receipt(request_event_id: str, requested_at: datetime, deleted: dict[str, dict[str, int]],
                   completed_at: datetime, key: Ed25519PrivateKey) -> ErasureReceipt:
    """The receipt of one erasure, once everything it counts is done: what was deleted, what still
    waits (and until when), signed."""
    pending = {
        "compacted topics": f"earlier values under the person's key on {', '.join(ERASABLE_TOPICS)} are removed "
                            f"by compaction by {(completed_at + COMPACTED_WITHIN).isoformat(timespec='seconds')}; "
                            f"the tombstones themselves {TOMBSTONE_KEPT.days} day later",
        "other topics": "generation results and dead letters go with their topics' retention: by "
                        f"{(completed_at + timedelta(milliseconds=RESULTS_KEPT_MS)).date()} and "
                        f"{(completed_at + timedelta(milliseconds=DEAD_LETTERS_KEPT_MS)).date()}",
        "serving": "each serving worker deletes the person's generated images, results and LoRA adapter "
                   "when it reads the tombstone on style-vectors",
    }
    receipt = ErasureReceipt(request_event_id=request_event_id, requested_at=requested_at,
                             completed_at=completed_at, deleted=deleted, pending=pending,
                             key_id=key_id(key.public_key()))
    signature = base64.b64encode(key.sign(_signed_bytes(receipt))).decode()
    return receipt.model_copy(update={"signature": signature})


def verify_receipt(receipt: ErasureReceipt, public: Ed25519PublicKey) -> bool:
    """True if the receipt is exactly as the holder of `public`'s private key signed it."""
    if receipt.key_id != key_id(public):
        return False
    try:
        public.verify(base64.b64decode(receipt.signature, validate=True), _signed_bytes(receipt))
    except (InvalidSignature, ValueError):
        return False
    return True


def tombstone_event(user_id: str, last_version: int, now: datetime, notice: ErasureNotice) -> StyleVectorUpdated:
    """The last style-vectors event of a forgotten person: every version withdrawn, drop them; with
    the requests it answers and what ingestion's state deleted, for whoever erases the rest."""
    return StyleVectorUpdated(event_id=f"{user_id}:forgotten:{notice.requests[0].event_id}", user_id=user_id,
                              event_time=now, version=last_version + 1, photo_count=0, embedding=[], features={},
                              tombstone=True, withdrawn_versions=list(range(1, last_version + 1)), erasure=notice)


def erasure_messages(user_id: str, last_version: int, now: datetime,
                     notice: ErasureNotice) -> list[tuple[str, bytes, bytes | None]]:
    """What an erasure publishes at once: the tombstone event, then a null-value tombstone for the
    person's key on every compacted topic the project writes under it."""
    key = user_id.encode()
    return [(STYLE_VECTORS, key, encode_event(tombstone_event(user_id, last_version, now, notice))),
            *((topic, key, None) for topic in ERASABLE_TOPICS)]
