"""Private key files made once and readable by their owner only (the erasure-signing key, the
API's URL-signing secret, the demo photo service's token-issuing key)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


def create_once(path: Path, content: bytes) -> None:
    """Write `content` to `path` (mode 0600) unless it exists; two processes racing keep one file."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique per call, not per process
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
        os.link(tmp, path)
    tmp.unlink()


def new_ed25519_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_key_pem(key: PrivateKeyTypes) -> bytes:
    """The public half of a private key, as PEM (SubjectPublicKeyInfo)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
