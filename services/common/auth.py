"""Authentication (JWT bearer) and the principal of the current call.

Tokens carry `sub` (the principal) and `roles` (a list of role names: viewer, developer,
approver, admin). HS256 with a shared secret is the local default; RS256/ES256 keys come
from a JWKS URL or file in production. Envoy verifies the same tokens at the edge; services
verify again because they can be reached directly.
"""

from __future__ import annotations

import contextvars
import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

import jwt

from services.common.errors import Unauthenticated
from services.common.settings import CommonSettings


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[str] = field(default_factory=frozenset)


ANONYMOUS_ADMIN = Principal("anonymous", frozenset({"admin"}))  # only with STRATA_AUTH=disabled

current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "strata_principal", default=ANONYMOUS_ADMIN
)


class Authenticator:
    """Verifies bearer tokens into Principals."""

    def __init__(self, settings: CommonSettings) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._jwks: jwt.PyJWKClient | None = None
        self._jwks_set: jwt.PyJWKSet | None = None
        if settings.jwt_jwks_url:
            self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300)
        if settings.jwt_jwks_file:
            self._jwks_set = jwt.PyJWKSet.from_json(settings.jwt_jwks_file.read_text())
        # Verified tokens are cached until they expire: verification costs tens of microseconds
        # per call and clients reuse a token for many calls.
        self._verify_cached = lru_cache(maxsize=4096)(self._verify)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing bearer token (authorization: Bearer <jwt>)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization header must be 'Bearer <jwt>'")
        principal, exp = self._verify_cached(token.strip())
        if exp is not None and exp < time.time():
            raise Unauthenticated("token expired")
        return principal

    def _key_for(self, token: str) -> tuple[object, list[str]]:
        header = jwt.get_unverified_header(token)
        alg = header.get("alg", "")
        if alg == "HS256" and self._secret:
            return self._secret, ["HS256"]
        asymmetric = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"]
        if alg in asymmetric and self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key, [alg]
        if alg in asymmetric and self._jwks_set is not None:
            kid = header.get("kid")
            for k in self._jwks_set.keys:
                if kid is None or k.key_id == kid:
                    return k.key, [alg]
            raise Unauthenticated(f"no key with kid {kid!r}")
        raise Unauthenticated(f"token algorithm {alg!r} is not accepted")

    def _verify(self, token: str) -> tuple[Principal, float | None]:
        try:
            key, algorithms = self._key_for(token)
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self._audience, issuer=self._issuer,
                options={"require": ["sub", "exp"]},
            )
        except Unauthenticated:
            raise
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        roles = claims.get("roles", [])
        if isinstance(roles, str):
            roles = roles.split()
        return Principal(str(claims["sub"]), frozenset(str(r) for r in roles)), claims.get("exp")


def mint_token(
    secret: str, subject: str, roles: list[str], *, ttl_seconds: int = 3600,
    issuer: str = "strata", audience: str = "strata-api",
) -> str:
    """An HS256 token, for local development, tests and the demo."""
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "sub": subject, "roles": roles, "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, secret, algorithm="HS256")


def service_token(settings: object, subject: str, roles: list[str], explicit: object | None = None) -> str | None:
    """The token one service presents to another: the one configured (`explicit`, a SecretStr),
    else, with auth on and an HS256 secret, one minted for `subject` with `roles` (valid a year);
    None when auth is off."""
    if explicit is not None:
        return explicit.get_secret_value()  # type: ignore[attr-defined]
    if settings.auth == "enabled" and settings.jwt_secret is not None:  # type: ignore[attr-defined]
        return mint_token(settings.jwt_secret.get_secret_value(), subject, roles,  # type: ignore[attr-defined]
                          ttl_seconds=365 * 86400, issuer=settings.jwt_issuer,  # type: ignore[attr-defined]
                          audience=settings.jwt_audience)  # type: ignore[attr-defined]
    return None


def hs256_jwks(secret: str) -> str:
    """The JWKS form of an HS256 secret, as Envoy's jwt_authn wants it."""
    k = jwt.utils.base64url_encode(secret.encode()).decode()
    return json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": k}]})
