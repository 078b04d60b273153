"""Analytics see pseudonymous user ids: a keyed hash (HMAC-SHA256) of the user id.

The key lives beside the state (`state/analytics.key`, readable by its owner only) and never in the
history, so a pseudonym can neither be traced back to a person nor recomputed from a guessed id by
whoever reads the history; an operator holding the key can still find one user's rows
(`stylestream drift user ID --raw-id`). Back the key up with the state: history written under a
lost key cannot be joined with history written under a new one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import pyarrow as pa

from stylestream.keyfiles import create_once
from stylestream.pipelines.layout import KEY_FILE


def new_key() -> bytes:
    return secrets.token_bytes(32)


def load_or_create_key(state_dir: Path) -> bytes:
    """The deployment's key, created on first use (atomically: concurrent first users agree)."""
    path = state_dir / KEY_FILE
    create_once(path, new_key())
    return load_key(path)


def load_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the analytics key {path}: {e.strerror}; it is created by "
                                "ingestion in its state folder") from None
    if len(key) < 16:
        raise ValueError(f"{path} is not an analytics key ({len(key)} bytes)")
    return key


def pseudonym(user_id: str, key: bytes) -> str:
    return "u" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def pseudonymize(table: pa.Table, key: bytes) -> pa.Table:
    """The table with its user_id column replaced by pseudonyms."""
    ids = [pseudonym(u, key) for u in table.column("user_id").to_pylist()]
    return table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.string()))


def subject(user_id: str, key: bytes) -> str:
    """Who was forgotten, as the state remembers it: a keyed hash of the user id (not the history's
    pseudonym), so that their earlier events arriving late are recognised and dropped."""
    return "f" + hmac.new(key, b"forgotten\0" + user_id.encode(), hashlib.sha256).hexdigest()[:32]
