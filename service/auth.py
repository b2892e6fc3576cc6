"""CDS Hooks client authentication: the trusted-client registry, JWK Sets, and JWT validation.

CDS Hooks 2.0 "Trusting CDS Clients": every call carries `Authorization: Bearer <JWT>` signed by the
EHR with an asymmetric key. We accept a token only when
- its `iss` is a registered trusted client (RPL_CDS_TRUSTED_CLIENTS),
- it is signed with an allowlisted asymmetric algorithm by a key of that client's JWK Set, which
  comes either inline from the registry or from the registry's `jku` URL (never from a URL taken
  from the token: a `jku` header that differs from the registered one is refused before any fetch),
- `aud` is the URL actually invoked, `exp`/`iat`/`nbf` hold with a small leeway, the lifetime is
  short, `jti` is new (replay store) and `tenant` is allowed when the client lists tenants.

Failures raise `AuthError` with a reason meant for the service log only; clients always get the same
generic 401 (the reason would help an attacker). Reasons never contain the token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jsonschema import Draft202012Validator
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .config import ConfigError, is_loopback_host

log = logging.getLogger(__name__)

# Asymmetric only (CDS Hooks 2.0 forbids `none` and every symmetric algorithm). ES384 and RS384 are
# the RECOMMENDED pair; ES256, RS256 and PS384 are equally sound and seen in the field. Because no
# HS* algorithm is ever accepted, an RSA public key can never be misused as an HMAC secret.
ALLOWED_ALGORITHMS: tuple[str, ...] = ("ES384", "RS384", "ES256", "RS256", "PS384")
_EC_CURVE_BY_ALG = {"ES256": "secp256r1", "ES384": "secp384r1"}
_RSA_ALGS = {"RS256", "RS384", "PS384"}
MIN_RSA_BITS = 2048

DEFAULT_LEEWAY_SECONDS = 60  # clock skew tolerated on exp / iat / nbf (Inferno CRD uses 60 s)
DEFAULT_MAX_LIFETIME_SECONDS = 3600  # exp - iat; [BP]: JWTs should live no more than an hour
DEFAULT_JWKS_CACHE_SECONDS = 3600  # a fetched JWK Set is used for this long before a refresh
DEFAULT_JWKS_MIN_REFETCH_SECONDS = 60  # unknown `kid`: at most one extra fetch per jku per minute
JWKS_FETCH_TIMEOUT_SECONDS = (2.0, 3.0)  # connect, read
JWKS_MAX_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 16 * 1024
MAX_CLAIM_CHARS = 512

_COMPACT_JWS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class VerificationKey:
    key: PublicKey
    alg: str | None  # the JWK's own `alg`, when it names one: then only that algorithm is accepted


class AuthError(Exception):
    """The request is not authenticated. The message is for the log, never for the client."""


# --------------------------------------------------------------------------------------------
# Trusted-client registry (RPL_CDS_TRUSTED_CLIENTS)

TRUSTED_CLIENTS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rpl-cds trusted CDS clients",
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["iss"],
        "additionalProperties": False,
        "properties": {
            "iss": {"type": "string", "minLength": 1, "maxLength": MAX_CLAIM_CHARS},
            "name": {"type": "string", "description": "for people reading the file and the log"},
            "jku": {"type": "string", "minLength": 1, "description": "URL of the client's JWK Set"},
            "jwks": {
                "type": "object",
                "required": ["keys"],
                "properties": {
                    "keys": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["kty", "kid"],
                            "properties": {
                                "kty": {"enum": ["EC", "RSA"]},
                                "kid": {"type": "string", "minLength": 1},
                            },
                        },
                    }
                },
            },
            "tenants": {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"type": "string", "minLength": 1},
            },
        },
        "oneOf": [{"required": ["jku"]}, {"required": ["jwks"]}],
    },
}


@dataclass(frozen=True)
class TrustedClient:
    iss: str
    name: str | None = None
    jku: str | None = None  # JWK Set URL (fetched, cached) ...
    inline_keys: Mapping[str, VerificationKey] | None = None  # ... or keys given in the registry
    tenants: frozenset[str] | None = None  # None: any or no tenant

    @property
    def label(self) -> str:
        return self.name or self.iss


def load_trusted_clients(path: str | Path) -> dict[str, TrustedClient]:
    """Read and validate the registry file; a problem stops start-up with a ConfigError."""
    where = f"RPL_CDS_TRUSTED_CLIENTS ({path})"
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{where}: cannot read the file: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: not valid JSON: {error}") from None
    return parse_trusted_clients(raw, where)


def parse_trusted_clients(raw: object, where: str = "trusted clients") -> dict[str, TrustedClient]:
    validator = Draft202012Validator(TRUSTED_CLIENTS_SCHEMA)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        location = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        message = first.message
        if first.validator == "oneOf":
            message = "give exactly one of 'jku' (a JWK Set URL) or 'jwks' (an inline JWK Set)"
        raise ConfigError(f"{where}: at {location}: {message}")
    clients: dict[str, TrustedClient] = {}
    for index, entry in enumerate(raw):  # type: ignore[arg-type]
        at = f"{where}: entry {index} (iss {entry['iss']!r})"
        if entry["iss"] in clients:
            raise ConfigError(f"{at}: the same iss is registered twice")
        jku = entry.get("jku")
        if jku is not None:
            _check_jku(jku, at)
        inline = None
        if "jwks" in entry:
            try:
                inline = keys_from_jwks(entry["jwks"], strict=True)
            except ValueError as error:
                raise ConfigError(f"{at}: jwks: {error}") from None
        tenants = frozenset(entry["tenants"]) if "tenants" in entry else None
        clients[entry["iss"]] = TrustedClient(
            iss=entry["iss"], name=entry.get("name"), jku=jku, inline_keys=inline, tenants=tenants
        )
    return clients


def _check_jku(jku: str, at: str) -> None:
    parts = urlsplit(jku)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{at}: jku {jku!r} is not an absolute URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{at}: jku {jku!r} must use https (plain http is accepted only on loopback, for tests)"
        )
    if parts.username or parts.password:
        raise ConfigError(f"{at}: jku must not contain credentials")


# --------------------------------------------------------------------------------------------
# JWK Sets


def keys_from_jwks(jwks: object, *, strict: bool) -> dict[str, VerificationKey]:
    """`kid` -> public key for every usable signing key of a JWK Set.

    strict (the registry file): any unusable key is an error. Not strict (a fetched set): unusable
    keys are skipped with a warning, so one odd key in an EHR's set does not lock everyone out.
    """
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("a JWK Set is an object with a 'keys' array")
    keys: dict[str, VerificationKey] = {}
    for position, jwk in enumerate(jwks["keys"]):
        try:
            kid, key = _public_key_from_jwk(jwk)
            if kid in keys:
                raise ValueError(f"kid {kid!r} appears twice (it MUST be unique in the set)")
            keys[kid] = key
        except ValueError as error:
            if strict:
                raise ValueError(f"key {position}: {error}") from None
            log.warning("JWK Set: key %d skipped: %s", position, error)
    return keys


def _public_key_from_jwk(jwk: object) -> tuple[str, VerificationKey]:
    if not isinstance(jwk, dict):
        raise ValueError("a JWK is an object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("no 'kid'")
    kty = jwk.get("kty")
    if kty not in ("EC", "RSA"):
        # 'oct' (a shared secret) in particular is never a CDS client key.
        raise ValueError(f"kid {kid!r}: kty {kty!r} is not an asymmetric signing key (EC or RSA)")
    if jwk.get("use") not in (None, "sig"):
        raise ValueError(f"kid {kid!r}: 'use' is {jwk.get('use')!r}, not 'sig'")
    if "d" in jwk:
        raise ValueError(f"kid {kid!r}: holds a PRIVATE key; publish only the public part")
    alg = jwk.get("alg")
    if alg is not None and alg not in ALLOWED_ALGORITHMS:
        raise ValueError(f"kid {kid!r}: alg {alg!r} is not accepted ({', '.join(ALLOWED_ALGORITHMS)})")
    try:
        key = ECAlgorithm.from_jwk(jwk) if kty == "EC" else RSAAlgorithm.from_jwk(jwk)
    except (jwt.InvalidKeyError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"kid {kid!r}: not a valid {kty} public key ({error})") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"kid {kid!r}: RSA key of {key.key_size} bits (minimum {MIN_RSA_BITS})")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _EC_CURVE_BY_ALG.values():
        raise ValueError(f"kid {kid!r}: curve {key.curve.name} is not accepted (P-256 or P-384)")
    return kid, VerificationKey(key, alg)


class RemoteJwks:
    """The cached JWK Set of one allowlisted `jku`.

    Refreshed when older than `cache_seconds`; an unknown `kid` (key rotation) triggers one refetch,
    but never more than one fetch per `min_refetch_seconds`, so a flood of tokens with made-up kids
    cannot turn this service into a request amplifier against the EHR. If a fetch fails the
    previous keys stay in use.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float = DEFAULT_JWKS_CACHE_SECONDS,
        min_refetch_seconds: float = DEFAULT_JWKS_MIN_REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str], object] | None = None,
    ) -> None:
        self.url = url
        self.cache_seconds = cache_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self.clock = clock
        self._fetch = fetch or fetch_jwks
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch, successful or not
        self._lock = threading.Lock()

    def key(self, kid: str) -> VerificationKey | None:
        with self._lock:
            now = self.clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self.cache_seconds
            if stale and self._may_fetch(now):
                self._refresh(now)
            key = self._keys.get(kid)
            if key is None and self._may_fetch(now):
                self._refresh(now)
                key = self._keys.get(kid)
            return key

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.min_refetch_seconds

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        try:
            self._keys = keys_from_jwks(self._fetch(self.url), strict=False)
            self._fetched_at = now
        except (requests.RequestException, ValueError) as error:
            log.warning("JWK Set %s could not be fetched; keeping %d cached key(s): %s",
                        self.url, len(self._keys), error)


def fetch_jwks(url: str) -> object:
    """GET a JWK Set: no redirects (the allowlist names the exact URL), bounded time and size."""
    with requests.get(
        url,
        timeout=JWKS_FETCH_TIMEOUT_SECONDS,
        allow_redirects=False,
        stream=True,
        headers={"Accept": "application/json, application/jwk-set+json"},
    ) as response:
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        body = response.raw.read(JWKS_MAX_BYTES + 1, decode_content=True)
    if len(body) > JWKS_MAX_BYTES:
        raise ValueError(f"larger than {JWKS_MAX_BYTES} bytes")
    return json.loads(body)


# --------------------------------------------------------------------------------------------
# Token validation


@dataclass(frozen=True)
class Caller:
    """A verified CDS client, for the parts of the service that want to know who called."""

    iss: str
    client_name: str | None
    tenant: str | None
    kid: str


class ReplayGuard(Protocol):
    """What the authenticator needs from the replay store (service/replay.py): True the first
    time a digest is claimed, False ever after (until `expires_at`, epoch seconds)."""

    def claim(self, key_hash: str, expires_at: int) -> bool: ...


@dataclass
class Authenticator:
    clients: Mapping[str, TrustedClient]
    replay: ReplayGuard
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS
    max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME_SECONDS
    jwks_cache_seconds: float = DEFAULT_JWKS_CACHE_SECONDS
    jwks_min_refetch_seconds: float = DEFAULT_JWKS_MIN_REFETCH_SECONDS
    clock: Callable[[], float] = time.monotonic
    _remote: dict[str, RemoteJwks] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for client in self.clients.values():
            if client.jku and client.jku not in self._remote:
                self._remote[client.jku] = RemoteJwks(
                    client.jku,
                    cache_seconds=self.jwks_cache_seconds,
                    min_refetch_seconds=self.jwks_min_refetch_seconds,
                    clock=lambda: self.clock(),
                )

    def authenticate(self, authorization: str | None, audience: str) -> Caller:
        token = bearer_token(authorization)
        header = _header_of(token)
        claims = _unverified_claims(token)
        client = self._client_for(claims)
        key = self._key_for(client, header)
        verified = self._verify(token, key, header["alg"], client)
        check_audience(verified.get("aud"), audience)
        self._check_lifetime(verified)
        tenant = self._check_tenant(verified, client)
        # Last: only a token that is otherwise valid may occupy a slot in the replay store.
        digest = jti_hash(client.iss, verified["jti"])
        if not self.replay.claim(digest, int(verified["exp"]) + self.leeway_seconds + 1):
            raise AuthError(f"replayed jti (hash {digest[:12]}) from {client.label}")
        return Caller(iss=client.iss, client_name=client.name, tenant=tenant, kid=header["kid"])

    def _client_for(self, claims: Mapping[str, Any]) -> TrustedClient:
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise AuthError("no iss claim")
        client = self.clients.get(iss)
        if client is None:
            raise AuthError(f"iss not trusted: {_shorten(iss)}")
        return client

    def _key_for(self, client: TrustedClient, header: Mapping[str, Any]) -> PublicKey:
        kid = header["kid"]
        if client.inline_keys is not None:
            # Keys agreed out of band. A `jku` in the header is ignored: nothing is ever fetched.
            key = client.inline_keys.get(kid)
        else:
            jku = header.get("jku")
            if jku is not None and jku != client.jku:
                # Checked before any fetch: an attacker's jku is never contacted.
                raise AuthError(f"jku {_shorten(str(jku))} is not the one registered for {client.label}")
            key = self._remote[client.jku].key(kid)  # type: ignore[index]
        if key is None:
            raise AuthError(f"unknown kid {_shorten(kid)} for {client.label}")
        _check_key_fits_alg(key, header["alg"], kid)
        return key.key

    def _verify(self, token: str, key: PublicKey, alg: str, client: TrustedClient) -> dict:
        try:
            return jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                issuer=client.iss,
                leeway=self.leeway_seconds,
                options={
                    "require": ["iss", "aud", "exp", "iat", "jti"],
                    "verify_aud": False,  # checked by check_audience (URL normalisation)
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError(f"bad signature ({alg}) for {client.label}") from None
        except jwt.PyJWTError as error:
            raise AuthError(f"invalid token from {client.label}: {error}") from None

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        exp, iat = claims["exp"], claims["iat"]
        if not _is_number(exp) or not _is_number(iat):
            raise AuthError("exp and iat must be numbers")
        if exp - iat > self.max_lifetime_seconds:
            raise AuthError(f"lifetime exp - iat = {exp - iat:.0f} s exceeds {self.max_lifetime_seconds} s")
        if exp <= iat:
            raise AuthError("exp is not after iat")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_CLAIM_CHARS:
            raise AuthError("jti must be a non-empty string")

    @staticmethod
    def _check_tenant(claims: Mapping[str, Any], client: TrustedClient) -> str | None:
        tenant = claims.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise AuthError("tenant must be a string")
        if client.tenants is not None and tenant not in client.tenants:
            raise AuthError(f"tenant {_shorten(str(tenant))} not allowed for {client.label}")
        return tenant


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("Authorization is not a Bearer token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("token too long")
    if not _COMPACT_JWS.match(token):
        raise AuthError("Bearer token is not a compact JWS (three base64url parts)")
    return token


def _header_of(token: str) -> dict:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as error:
        raise AuthError(f"unreadable JWT header: {error}") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AuthError(f"alg {_shorten(str(alg))} not accepted")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.upper() != "JWT":
        raise AuthError(f"typ must be 'JWT', got {_shorten(str(typ))}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_CLAIM_CHARS:
        raise AuthError("no kid in the JWT header")
    if "crit" in header or "b64" in header:
        raise AuthError("JWT header uses 'crit'/'b64' extensions this service does not support")
    return header


def _unverified_claims(token: str) -> dict:
    """Only to find the issuer (and so the keys); nothing here is trusted before the signature."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as error:
        raise AuthError(f"unreadable JWT payload: {error}") from None
    return claims


def _check_key_fits_alg(entry: VerificationKey, alg: str, kid: str) -> None:
    if entry.alg is not None and entry.alg != alg:
        raise AuthError(f"alg {alg} but key {_shorten(kid)} is for {entry.alg}")
    key = entry.key
    if alg in _RSA_ALGS:
        if not isinstance(key, rsa.RSAPublicKey):
            raise AuthError(f"alg {alg} with the non-RSA key {_shorten(kid)}")
    elif not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != _EC_CURVE_BY_ALG[alg]:
        raise AuthError(f"alg {alg} does not fit key {_shorten(kid)}")


def check_audience(aud: object, expected: str) -> None:
    """`aud` (a string or an array of strings) must name the endpoint invoked.

    Both sides are normalised the same way: scheme and host lower-case, default port dropped, one
    trailing slash ignored (`.../cds-services/` == `.../cds-services`); path case, query and
    everything else must match exactly.
    """
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise AuthError("aud must be a string or an array of strings")
    wanted = normalize_url(expected)
    if not any(normalize_url(value) == wanted for value in values):
        shown = ", ".join(_shorten(v, 120) for v in values[:3])
        raise AuthError(f"aud {shown} is not this endpoint ({expected})")


def normalize_url(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return "\0invalid"
    if port is not None and (scheme, port) not in (("https", 443), ("http", 80)):
        host = f"{host}:{port}"
    path = parts.path[:-1] if parts.path.endswith("/") else parts.path
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}{path}{query}"


def jti_hash(iss: str, jti: str) -> str:
    """What the replay store keeps: a digest of issuer and nonce, never the token itself."""
    return hashlib.sha256(f"{iss}\x00{jti}".encode()).hexdigest()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shorten(text: str, limit: int = 80) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def describe_clients(clients: Iterable[TrustedClient]) -> str:
    """A one-line summary for the start-up log (no key material)."""
    parts = []
    for client in clients:
        source = f"jku {client.jku}" if client.jku else f"{len(client.inline_keys or {})} inline key(s)"
        tenants = f", {len(client.tenants)} tenant(s)" if client.tenants else ""
        parts.append(f"{client.label} ({source}{tenants})")
    return "; ".join(parts)
