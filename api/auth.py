"""Who may do what: people sign in with a JWT their photo service issued; people grant other
applications scoped, expiring, revocable tokens.

A person's JWT is verified offline against the configured public key (PEM) or JWKS file: signature,
expiry, and issuer / audience where configured; its `sub` is the user id. Only asymmetric algorithms
are accepted, chosen by the key's type, so a token can never pick its own (`none`, or HS256 keyed
with the public key). A grant token is `ssg_<grant id>_<secret>`; only the secret's SHA-256 is
stored (the secret is 256 random bits, so a fast hash is enough), and it is looked up on every
request, so a revoked or expired grant stops working at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import TypeAdapter, ValidationError

from stylestream.api.errors import ApiError
from stylestream.api.store import ApiStore, Grant
from stylestream.schemas.events import Id

_USER_ID = TypeAdapter(Id)
STYLE_READ, IMAGES_GENERATE, CONSENT_WRITE = "style:read", "images:generate", "consent:write"
PHOTOS_CONTRIBUTE = "photos:contribute"  # a device sends what it computed from the person's photos
GRANTABLE = (STYLE_READ, IMAGES_GENERATE, CONSENT_WRITE, PHOTOS_CONTRIBUTE)
# Only the person themselves (their own JWT) manages grants, downloads their data or asks to be forgotten.
ACCOUNT = "account"
GRANT_PREFIX = "ssg_"
MAX_GRANT_DAYS = 365


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class Principal:
    user_id: str
    scopes: frozenset[str]
    grant_id: str | None = None  # None: the person themselves

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            who = f"grant {self.grant_id}" if self.grant_id else "this token"
            need = "the person's own sign-in" if scope == ACCOUNT else f"scope {scope}"
            raise ApiError(403, "insufficient_scope", f"{who} lacks {need}")


def _algorithms(key) -> list[str]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ["EdDSA"]
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ["ES256", "ES384", "ES512"]
    raise ValueError(f"unsupported key type {type(key).__name__} (use Ed25519, RSA or EC)")


class TokenVerifier:
    """Verifies people's JWTs with keys read once from a PEM public key or a JWKS file."""

    def __init__(self, keys: dict[str | None, object], issuer: str | None = None, audience: str | None = None):
        if not keys:
            raise ValueError("no public keys to verify tokens with")
        self._keys, self.issuer, self.audience = keys, issuer, audience

    @classmethod
    def from_file(cls, path: Path, issuer: str | None = None, audience: str | None = None) -> TokenVerifier:
        """A PEM public key, or a JWKS document (`{"keys": [...]}`) whose keys are chosen by `kid`."""
        data = path.read_bytes()
        if data.lstrip().startswith(b"{"):
            keys = {k.key_id: k.key for k in jwt.PyJWKSet.from_dict(json.loads(data)).keys}
        else:
            keys = {None: serialization.load_pem_public_key(data)}
        for key in keys.values():
            _algorithms(key)
        return cls(keys, issuer, audience)

    def user_id(self, token: str) -> str:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys.get(kid) or (next(iter(self._keys.values())) if len(self._keys) == 1 else None)
            if key is None:
                raise _unauthorized("invalid_token", f"no key with kid {kid!r}")
            claims = jwt.decode(token, key, algorithms=_algorithms(key), audience=self.audience, issuer=self.issuer,
                                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise _unauthorized("token_expired", "the sign-in token has expired") from None
        except jwt.PyJWTError as e:
            raise _unauthorized("invalid_token", f"the sign-in token is not valid: {e}") from None
        try:  # the subject becomes the user id of events: it must be one
            return _USER_ID.validate_python(claims["sub"])
        except ValidationError:
            raise _unauthorized("invalid_token", "the token's sub is not a user id stylestream accepts") from None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_grant(user_id: str, name: str, scopes: list[str], lifetime: timedelta,
              now: datetime | None = None) -> tuple[Grant, str]:
    """A grant and its token (shown once; only its hash is kept)."""
    bad = sorted(set(scopes) - set(GRANTABLE))
    if bad or not scopes:
        raise ApiError(400, "invalid_scope", f"scopes must be some of {', '.join(GRANTABLE)}; got {bad or 'none'}")
    if not timedelta(minutes=1) <= lifetime <= timedelta(days=MAX_GRANT_DAYS):
        raise ApiError(400, "invalid_lifetime", f"a grant lasts from a minute to {MAX_GRANT_DAYS} days")
    now = now or datetime.now(UTC)
    grant_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    grant = Grant(grant_id, user_id, name, tuple(sorted(set(scopes))), secret_hash(secret), now, now + lifetime, None)
    return grant, f"{GRANT_PREFIX}{grant_id}_{secret}"


def authenticate(authorization: str | None, verifier: TokenVerifier, store: ApiStore,
                 now: datetime | None = None) -> Principal:
    """The principal behind an `Authorization: Bearer ...` header, or a 401 ApiError."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing_token", "send Authorization: Bearer <token> (a sign-in JWT or a grant token)")
    token = token.strip()
    if not token.startswith(GRANT_PREFIX):
        return Principal(verifier.user_id(token), frozenset((*GRANTABLE, ACCOUNT)))
    grant_id, _, secret = token.removeprefix(GRANT_PREFIX).partition("_")
    grant = store.grant(grant_id)
    if grant is None or not hmac.compare_digest(grant.secret_sha256, secret_hash(secret)):
        raise _unauthorized("invalid_token", "unknown grant token")
    if not grant.live(now or datetime.now(UTC)):
        raise _unauthorized("token_revoked" if grant.revoked_at else "token_expired",
                        f"grant {grant.id} was {'revoked' if grant.revoked_at else 'expired'}")
    return Principal(grant.user_id, frozenset(grant.scopes), grant.id)


def issue_person_token(private_key_pem: bytes, user_id: str, lifetime: timedelta, issuer: str | None = None,
                       audience: str | None = None) -> str:
    """A sign-in JWT as a photo service issues one (the demo and tests play the photo service)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    now = datetime.now(UTC)
    claims = {"sub": user_id, "iat": now, "exp": now + lifetime}
    claims |= {"iss": issuer} if issuer else {}
    claims |= {"aud": audience} if audience else {}
    return jwt.encode(claims, key, algorithm=_algorithms(key.public_key())[0])
