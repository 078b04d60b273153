"""Sign-in token verification and grant creation, alone (no server): JWKS and PEM keys, forged and
confused tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from stylestream.api.auth import TokenVerifier, new_grant
from stylestream.api.errors import ApiError


def _b64(data: str | bytes) -> str:
    return base64.urlsafe_b64encode(data.encode() if isinstance(data, str) else data).decode().rstrip("=")


def _claims(sub: str = "ben", seconds: int = 60) -> dict:
    return {"sub": sub, "exp": datetime.now(UTC) + timedelta(seconds=seconds)}


def test_a_jwks_file_verifies_by_kid(tmp_path):
    keys = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("old", "new")}
    jwks = {"keys": [{**jwt.algorithms.ECAlgorithm.to_jwk(k.public_key(), as_dict=True), "kid": kid, "alg": "ES256"}
                     for kid, k in keys.items()]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    verifier = TokenVerifier.from_file(tmp_path / "jwks.json", issuer="photos.example", audience="stylestream")
    good = {**_claims(), "iss": "photos.example", "aud": "stylestream"}
    assert verifier.user_id(jwt.encode(good, keys["new"], "ES256", headers={"kid": "new"})) == "ben"
    assert verifier.user_id(jwt.encode(good, keys["old"], "ES256", headers={"kid": "old"})) == "ben"
    for token in (jwt.encode(good, keys["old"], "ES256", headers={"kid": "new"}),  # signed by another key
                  jwt.encode(good, keys["new"], "ES256", headers={"kid": "gone"}),  # unknown kid
                  jwt.encode({**good, "aud": "elsewhere"}, keys["new"], "ES256", headers={"kid": "new"}),
                  jwt.encode({**good, "iss": "someone"}, keys["new"], "ES256", headers={"kid": "new"}),
                  jwt.encode({"sub": "ben", "iss": "photos.example", "aud": "stylestream"}, keys["new"], "ES256",
                             headers={"kid": "new"})):  # no expiry
        with pytest.raises(ApiError) as e:
            verifier.user_id(token)
        assert e.value.status == 401 and e.value.code == "invalid_token"


def test_a_pem_key_refuses_algorithm_confusion(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    verifier = TokenVerifier.from_file(tmp_path / "key.pem")
    assert verifier.user_id(jwt.encode(_claims(), key, "RS256")) == "ben"
    for sub in ("", "ben smith", "a" * 201, 42):  # not a user id events can carry
        with pytest.raises(ApiError):
            verifier.user_id(jwt.encode({**_claims(), "sub": sub}, key, "RS256"))
    with pytest.raises(ApiError) as expired:
        verifier.user_id(jwt.encode(_claims(seconds=-5), key, "RS256"))
    assert expired.value.code == "token_expired"
    # HS256 keyed with the public key itself, the classic confusion (signed by hand: PyJWT refuses a
    # PEM as an HMAC secret): only the key type's own algorithms are accepted.
    signing = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}))}.{_b64(json.dumps({'sub': 'ben', 'exp': 2**40}))}"
    forged = f"{signing}.{_b64(hmac.new(pem, signing.encode(), hashlib.sha256).digest())}"
    with pytest.raises(ApiError) as e:
        verifier.user_id(forged)
    assert e.value.code == "invalid_token"


def test_grants_take_known_scopes_and_sane_lifetimes():
    grant, token = new_grant("ben", "shop", ["style:read"], timedelta(days=1))
    assert token.startswith(f"ssg_{grant.id}_") and grant.secret_sha256 not in token
    for scopes, lifetime in ((["admin"], timedelta(days=1)), ([], timedelta(days=1)),
                             (["style:read"], timedelta(seconds=5)), (["style:read"], timedelta(days=400))):
        with pytest.raises(ApiError) as e:
            new_grant("ben", "shop", scopes, lifetime)
        assert e.value.status == 400
