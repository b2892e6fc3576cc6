"""Trust: JWT authentication of CDS clients, CORS, security headers and the request log.

Which requests need a JWT (with RPL_CDS_AUTH=required): every method except OPTIONS on a path equal
to, or below, one of `PROTECTED_PREFIXES` -- discovery (`/cds-services`), each service
(`/cds-services/<id>`), feedback (`/cds-services/<id>/feedback`) and analytics (`/analytics...`).
Unknown paths below those prefixes need it too, so a 404 reveals nothing to an anonymous caller.
Everything else (health, metrics, the local playground pages, static files) is outside this rule.
CORS preflights (OPTIONS) never carry a JWT and are answered here, before authentication.

Every response gets JSON-API security headers. A view that serves something else (an HTML page)
sets its own `Content-Security-Policy` (or `Cache-Control`, ...) on its response; the defaults here
are only added where the response has none.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, g, request
from werkzeug.serving import WSGIRequestHandler

from . import request_log
from .auth import (
    DEFAULT_JWKS_CACHE_SECONDS,
    DEFAULT_JWKS_MIN_REFETCH_SECONDS,
    DEFAULT_LEEWAY_SECONDS,
    DEFAULT_MAX_LIFETIME_SECONDS,
    Authenticator,
    AuthError,
    describe_clients,
    load_trusted_clients,
)
from .config import ConfigError, Settings
from .errors import ApiError

log = logging.getLogger(__name__)

PROTECTED_PREFIXES: tuple[str, ...] = ("/cds-services", "/analytics")

UNAUTHENTICATED_MESSAGE = "Authentication failed: a valid CDS Hooks JWT from a trusted client is required."
WWW_AUTHENTICATE = 'Bearer realm="rpl-cds"'

CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
CORS_ALLOW_HEADERS = "Content-Type, Authorization"
CORS_EXPOSE_HEADERS = "WWW-Authenticate, Location, Content-Location"
CORS_MAX_AGE_SECONDS = "600"

JSON_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    # A JSON answer needs no scripts, styles, frames or forms: forbid everything.
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
}
HSTS = "max-age=31536000"


def is_protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)


def init_app(app: Flask) -> None:
    settings: Settings = app.config["RPL_SETTINGS"]
    request_log.init_app(app)
    app.extensions["rpl_cors"] = CorsPolicy.from_settings(settings)
    if settings.auth == "required":
        app.extensions["rpl_auth"] = build_authenticator(app, settings)
    app.before_request(_guard)
    app.after_request(_add_headers)


def build_authenticator(app: Flask, settings: Settings) -> Authenticator:
    from .db import engine_for
    from .replay import ReplayStore

    if not settings.trusted_clients_file:
        raise ConfigError(
            "RPL_CDS_AUTH=required but RPL_CDS_TRUSTED_CLIENTS is not set: no EHR could call. "
            "Register the trusted clients (docs/trusted-clients.md) or, for a local demo only, "
            "set RPL_CDS_AUTH=disabled."
        )
    clients = load_trusted_clients(settings.trusted_clients_file)
    log.info("trusted CDS clients: %s", describe_clients(clients.values()))
    if not settings.public_url:
        log.warning(
            "RPL_CDS_PUBLIC_URL is not set: JWT audiences are checked against the Host header of "
            "each request. Set it to the external base URL in production."
        )
    config = app.config
    return Authenticator(
        clients=clients,
        replay=ReplayStore(lambda: engine_for(app)),
        leeway_seconds=config.get("RPL_JWT_LEEWAY_SECONDS", DEFAULT_LEEWAY_SECONDS),
        max_lifetime_seconds=config.get("RPL_JWT_MAX_LIFETIME_SECONDS", DEFAULT_MAX_LIFETIME_SECONDS),
        jwks_cache_seconds=config.get("RPL_JWKS_CACHE_SECONDS", DEFAULT_JWKS_CACHE_SECONDS),
        jwks_min_refetch_seconds=config.get(
            "RPL_JWKS_MIN_REFETCH_SECONDS", DEFAULT_JWKS_MIN_REFETCH_SECONDS
        ),
    )


def invoked_url() -> str:
    """The externally visible URL of this request, without query: what `aud` must name."""
    public_url = current_app.config["RPL_SETTINGS"].public_url
    if public_url:
        return public_url.rstrip("/") + request.path
    return request.base_url


def _guard() -> Response | None:
    if not is_protected(request.path):
        return None
    if request.method == "OPTIONS":
        preflight = Response(status=204, headers={"Allow": allowed_methods()})
        del preflight.headers["Content-Type"]  # no body
        return preflight
    authenticator: Authenticator | None = current_app.extensions.get("rpl_auth")
    g.rpl_caller = None
    if authenticator is None:  # RPL_CDS_AUTH=disabled (warned about at start-up)
        return None
    from .replay import ReplayStoreUnavailable

    started = time.perf_counter()
    try:
        g.rpl_caller = authenticator.authenticate(request.headers.get("Authorization"), invoked_url())
    except AuthError as error:
        g.rpl_auth_failure = str(error)
        raise ApiError(401, UNAUTHENTICATED_MESSAGE, headers={"WWW-Authenticate": WWW_AUTHENTICATE})
    except ReplayStoreUnavailable:
        g.rpl_auth_failure = "replay store unavailable"
        raise ApiError(
            503, "The service cannot check credentials right now; try again shortly.",
            headers={"Retry-After": "5"},
        ) from None
    finally:
        g.rpl_auth_ms = round((time.perf_counter() - started) * 1000, 2)
    return None


def allowed_methods() -> str:
    """The methods of the matched route (RFC 9110 Allow), HEAD left out as our OpenAPI does."""
    rule = request.url_rule
    methods = set(rule.methods or ()) - {"HEAD"} if rule is not None else {"OPTIONS"}
    return ", ".join(sorted(methods | {"OPTIONS"}))


def _add_headers(response: Response) -> Response:
    for name, value in JSON_SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    current_app.extensions["rpl_cors"].apply(response)
    return response


# ------------------------------------------------------------------------------------------
# CORS


@dataclass(frozen=True)
class CorsPolicy:
    """Which browser origins may read our answers. No credentials (no cookies) are ever allowed."""

    any_origin: bool
    origins: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> CorsPolicy:
        configured = settings.cors_origins
        if not configured:
            # Production default: no browser origin. `make run` (local mode): any origin.
            return cls(any_origin=settings.local_mode, origins=frozenset())
        origins = set()
        for item in configured:
            if item == "*":
                return cls(any_origin=True, origins=frozenset())
            origins.add(_normalize_origin(item))
        return cls(any_origin=False, origins=frozenset(origins))

    def allowed_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for this request's Origin, or None."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.lower().rstrip("/") in self.origins else None

    def apply(self, response: Response) -> None:
        if not self.any_origin:
            response.vary.add("Origin")
        allow = self.allowed_origin(request.headers.get("Origin"))
        if allow is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
            response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
            response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE_SECONDS


def _normalize_origin(value: str) -> str:
    parts = urlsplit(value.strip())
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"RPL_CDS_CORS_ORIGINS: {value!r} is not an origin (scheme://host[:port], no path) or '*'"
        )
    return f"{parts.scheme}://{parts.netloc}".lower()


# ------------------------------------------------------------------------------------------
# Development server


class QuietRequestHandler(WSGIRequestHandler):
    """For `app.run(request_handler=...)`: no Werkzeug/Python version in the Server header."""

    def version_string(self) -> str:
        return "rpl-cds"
