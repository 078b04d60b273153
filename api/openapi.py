"""The published OpenAPI spec (api/openapi.json), generated from the app's routes and models."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stylestream.api.app import create_app
from stylestream.api.auth import TokenVerifier
from stylestream.api.config import ApiConfig

SPEC_PATH = Path(__file__).parent / "openapi.json"


def spec() -> dict:
    # The spec does not depend on the keys or the broker; the app is built, never started.
    verifier = TokenVerifier({None: Ed25519PrivateKey.generate().public_key()})
    return create_app(ApiConfig("127.0.0.1:9092", Path("."), verifier)).openapi()


def spec_text() -> str:
    return json.dumps(spec(), indent=2, sort_keys=True) + "\n"
