"""Real keys, real signed CDS Hooks JWTs and a real JWK Set endpoint, for any test that needs
authenticated calls.

    from tests.support_jwt import SigningKey, RecordingServer, trusted_clients_file

    with RecordingServer() as ehr:                       # http://127.0.0.1:<port>, in a thread
        key = SigningKey.ec_p384("ehr-key-1")            # or SigningKey.rsa("kid") (RS384)
        ehr.publish_jwks([key])                          # GET /jwks.json now serves it
        path = trusted_clients_file(tmp_path, [{"iss": ISS, "jku": ehr.url("/jwks.json")}])
        app = make_app(settings, auth="required", trusted_clients_file=str(path))
        token = key.token(iss=ISS, aud="http://localhost/cds-services")  # fresh jti each call
        client.get("/cds-services", headers=bearer(token))
        assert ehr.requests_to("/jwks.json") == 1

`RecordingServer` records every request it receives (method, path, headers, body), so a test can
assert that nothing arrived (no JWKS fetch from a forbidden jku, no FHIR query to a forbidden
server). Besides `/jwks.json` it can answer any path with canned JSON (`respond(path, body)`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

# The Flask test client's default host: the URL a token's `aud` must name when no public URL is set.
TEST_CLIENT_BASE = "http://localhost"


@dataclass
class SigningKey:
    """An EHR's signing key pair (EC or RSA) with its `kid` and default algorithm."""

    kid: str
    alg: str
    private_key: Any

    @classmethod
    def ec_p384(cls, kid: str | None = None) -> SigningKey:
        return cls(kid or f"ec-{uuid.uuid4()}", "ES384", ec.generate_private_key(ec.SECP384R1()))

    @classmethod
    def ec_p256(cls, kid: str | None = None) -> SigningKey:
        return cls(kid or f"ec256-{uuid.uuid4()}", "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def rsa(cls, kid: str | None = None, alg: str = "RS384", bits: int = 2048) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return cls(kid or f"rsa-{uuid.uuid4()}", alg, key)

    def public_jwk(self, *, with_alg: bool = True) -> dict:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig"})
        if with_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        *,
        iss: str,
        aud: str | list[str],
        lifetime: int = 300,
        iat: float | None = None,
        exp: float | None = None,
        jti: str | None = None,
        alg: str | None = None,
        kid: str | None = None,
        jku: str | None = None,
        typ: str | None = "JWT",
        tenant: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, Any] | None = None,
        omit: Iterable[str] = (),
    ) -> str:
        """A CDS Hooks JWT as an EHR signs it. `omit` drops claims or header fields by name."""
        payload, headers = cds_hooks_claims(
            iss=iss, aud=aud, lifetime=lifetime, iat=iat, exp=exp, jti=jti,
            kid=kid or self.kid, jku=jku, typ=typ, tenant=tenant,
            extra_claims=extra_claims, extra_headers=extra_headers, omit=omit,
        )
        return jwt.encode(payload, self.private_key, algorithm=alg or self.alg, headers=headers)


def cds_hooks_claims(
    *,
    iss: str,
    aud: str | list[str],
    lifetime: int = 300,
    iat: float | None = None,
    exp: float | None = None,
    jti: str | None = None,
    kid: str | None = None,
    jku: str | None = None,
    typ: str | None = "JWT",
    tenant: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, Any] | None = None,
    omit: Iterable[str] = (),
) -> tuple[dict, dict]:
    """(payload, header) of a CDS Hooks 2.0 JWT."""
    now = int(time.time())
    issued = int(iat if iat is not None else now)
    payload: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "iat": issued,
        "exp": int(exp if exp is not None else issued + lifetime),
        "jti": jti or str(uuid.uuid4()),
    }
    if tenant is not None:
        payload["tenant"] = tenant
    payload.update(extra_claims or {})
    headers: dict[str, Any] = {"typ": typ, "kid": kid}
    if jku is not None:
        headers["jku"] = jku
    headers.update(extra_headers or {})
    for name in omit:
        payload.pop(name, None)
        headers.pop(name, None)
    headers = {k: v for k, v in headers.items() if v is not None}
    if "typ" not in headers:
        headers["typ"] = None  # PyJWT adds typ "JWT" unless told None
    return payload, headers


def unsigned_token(payload: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """An `alg: none` token (RFC 7519 "unsecured JWT"): header.payload. with an empty signature."""
    return f"{_b64(_present(header, alg='none'))}.{_b64(dict(payload))}."


def _present(header: Mapping[str, Any], **updates: Any) -> dict:
    return {k: v for k, v in {**header, **updates}.items() if v is not None}


def hmac_token(payload: Mapping[str, Any], header: Mapping[str, Any], secret: bytes, alg: str = "HS256") -> str:
    """An HS* token signed with `secret`, built by hand: PyJWT refuses (rightly) to use a PEM
    public key as an HMAC secret, which is exactly the key-confusion attack we want to send."""
    import hashlib
    import hmac

    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{_b64(_present(header, alg=alg))}.{_b64(dict(payload))}"
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64_bytes(signature)}"


def _b64(obj: Mapping[str, Any]) -> str:
    return _b64_bytes(json.dumps(obj, separators=(",", ":")).encode())


def _b64_bytes(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jwks_of(keys: Iterable[SigningKey]) -> dict:
    return {"keys": [k.public_jwk() for k in keys]}


def trusted_clients_file(directory: Path, entries: list[dict], name: str = "trusted-clients.json") -> Path:
    path = Path(directory) / name
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# A real HTTP endpoint on 127.0.0.1 that records every request


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # with query string
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingServer:
    """A threaded HTTP server on 127.0.0.1 (ephemeral port) that records every request.

    GET /jwks.json serves the published JWK Set; `respond(path, body)` adds canned JSON answers
    (matched on the path without query; a route ending in '*' is a prefix, the longest wins); everything else 404.
    """

    requests: list[RecordedRequest] = field(default_factory=list)
    _routes: dict[str, tuple[int, bytes, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> RecordingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder._record(RecordedRequest(self.command, self.path, dict(self.headers), body))
                status, payload, content_type = recorder._answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def base(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def publish_jwks(self, keys: Iterable[SigningKey], path: str = "/jwks.json") -> None:
        self.respond(path, jwks_of(keys))

    def respond(self, path: str, body: Any, status: int = 200, content_type: str = "application/json") -> None:
        with self._lock:
            self._routes[path] = (status, json.dumps(body).encode(), content_type)

    def requests_to(self, path_prefix: str = "/") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def _record(self, recorded: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(recorded)

    def _answer(self, raw_path: str) -> tuple[int, bytes, str]:
        path = raw_path.split("?", 1)[0]
        with self._lock:
            if path in self._routes:
                return self._routes[path]
            prefixes = [r for r in self._routes if r.endswith("*") and path.startswith(r[:-1])]
            if prefixes:
                return self._routes[max(prefixes, key=len)]  # the most specific prefix
        return 404, b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found"}]}', "application/json"
