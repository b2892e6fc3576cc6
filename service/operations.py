"""Operations endpoints: liveness (`/healthz`), readiness (`/readyz`) and Prometheus metrics
(`/metrics`). None of them needs a JWT and none of them ever shows patient data.

Metrics are per CDS Service id (a small, fixed set: never a value taken from the URL unchecked):
hook requests by status, errors by status, hook latency, cards by rule id (the card's
`source.topic.code`), FHIR fallback calls by prefetch key and their latency.

Several gunicorn workers: each worker counts on its own, so a scrape would see one random worker.
Set PROMETHEUS_MULTIPROC_DIR to an empty directory *before gunicorn starts* (prometheus-client
switches to shared memory-mapped files at import time); `/metrics` then adds up every worker.
gunicorn.conf.py must create and empty that directory before the workers fork, and call
`prometheus_client.multiprocess.mark_process_dead(worker.pid)` in its `child_exit` hook.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy import text

log = logging.getLogger(__name__)
bp = Blueprint("operations", __name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Readiness must answer quickly even when the database hangs (a load balancer waits for it).
READINESS_DB_TIMEOUT_S = 2.0
UNKNOWN_SERVICE = "unknown"
_HOOK_ENDPOINT = "hooks.call_service"
# Label values never come from the client unchecked (each new value is a new time series).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Hook latency: the useful range is a few ms (prefetch only) up to the 2 s FHIR deadline.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

HOOK_REQUESTS = Counter(
    "rpl_cds_hook_requests",
    "CDS Hooks service calls, by service id and HTTP status.",
    ["service", "status"],
)
HOOK_ERRORS = Counter(
    "rpl_cds_hook_errors",
    "CDS Hooks service calls answered with a 4xx/5xx status, by service id and status.",
    ["service", "status"],
)
HOOK_LATENCY = Histogram(
    "rpl_cds_hook_duration_seconds",
    "Time to answer a CDS Hooks service call (whole request, all statuses).",
    ["service"],
    buckets=_LATENCY_BUCKETS,
)
CARDS = Counter(
    "rpl_cds_cards",
    "Cards returned, by service id and rule id (the card's source.topic.code).",
    ["service", "rule"],
)
FHIR_FALLBACK_CALLS = Counter(
    "rpl_cds_fhir_fallback_calls",
    "Prefetch keys the service had to fetch from the EHR's FHIR server, by service and key.",
    ["service", "key"],
)
FHIR_FALLBACK_LATENCY = Histogram(
    "rpl_cds_fhir_fallback_duration_seconds",
    "Time spent fetching missing prefetch keys from the FHIR server (one observation per call).",
    ["service"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "rpl_cds_http_requests",
    "Every HTTP request, by route pattern (never the raw path), method and status.",
    ["route", "method", "status"],
)


def init_app(app: Flask) -> None:
    """Register the endpoints and the per-request bookkeeping that feeds the metrics."""
    app.register_blueprint(bp)
    # The latency is counted from the request log's start time (service/request_log.py, taken
    # before the JWT check): one clock per request.
    app.after_request(_record_request)


# --- endpoints -------------------------------------------------------------------------------


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers HTTP. Deliberately checks nothing else."""
    return _no_store(jsonify({"status": "ok"}))


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: guideline knowledge is loaded and the database answers `SELECT 1`."""
    checks = {
        "knowledge": "ok" if _knowledge_loaded(current_app) else "not loaded",
        "database": _database_status(current_app._get_current_object()),
    }
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return _no_store(jsonify(body)), 200 if ready else 503


@bp.get("/metrics")
def metrics() -> Response:
    registry = _scrape_registry()
    return _no_store(Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST))


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


# --- readiness -------------------------------------------------------------------------------


def _knowledge_loaded(app: Flask) -> bool:
    # create_app refuses to start with broken knowledge files; this guards against an app object
    # whose start-up was cut short (and documents what "ready" means).
    return bool(app.extensions.get("rpl_services")) and app.extensions.get("rpl_codes") is not None


def _database_status(app: Flask) -> str:
    from .db import engine_for

    def select_one() -> None:
        with engine_for(app).connect() as connection:
            connection.execute(text("SELECT 1")).scalar_one()

    outcome = run_with_timeout(select_one, READINESS_DB_TIMEOUT_S)
    if outcome is None:
        return "ok"
    # The exception text may name hosts or users: log its type only, answer a fixed word.
    log.warning("readiness: database check failed (%s)", outcome)
    return "unreachable"


def run_with_timeout(work: Callable[[], None], seconds: float) -> str | None:
    """Run `work` in a daemon thread; None on success, else a short reason (never raises).

    Driver timeouts (connect_timeout, SQLite busy timeout) normally end a failing check first;
    this bound holds even when a connection hangs after it was opened.
    """
    failure: list[str] = []

    def target() -> None:
        try:
            work()
        except Exception as error:  # noqa: BLE001 - any failure means "not ready"
            failure.append(type(error).__name__)

    worker = threading.Thread(target=target, name="rpl-readiness", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        return f"timeout after {seconds:g} s"
    return failure[0] if failure else None


# --- metrics ---------------------------------------------------------------------------------


def _scrape_registry() -> CollectorRegistry:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def _record_request(response: Response) -> Response:
    status = str(response.status_code)
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in _KNOWN_METHODS else "other"
    HTTP_REQUESTS.labels(rule, method, status).inc()
    if request.endpoint == _HOOK_ENDPOINT:
        _record_hook_call(response, status)
    return response


def _record_hook_call(response: Response, status: str) -> None:
    service = _service_label()
    HOOK_REQUESTS.labels(service, status).inc()
    if response.status_code >= 400:
        HOOK_ERRORS.labels(service, status).inc()
    started = g.get("rpl_request_started")
    if started is not None:
        HOOK_LATENCY.labels(service).observe(time.perf_counter() - started)
    for rule_id in g.get("rpl_card_topics") or ():
        CARDS.labels(service, rule_id or "none").inc()
    fetched_keys = g.get("rpl_fetched_keys") or ()
    for key in fetched_keys:
        FHIR_FALLBACK_CALLS.labels(service, key).inc()
    fetch_ms = g.get("rpl_fetch_ms")
    if fetched_keys and isinstance(fetch_ms, (int, float)):
        FHIR_FALLBACK_LATENCY.labels(service).observe(fetch_ms / 1000)


def _service_label() -> str:
    """The service id, only when it names a registered service (labels must stay a fixed set)."""
    service_id = g.get("rpl_service_id") or (request.view_args or {}).get("service_id")
    registered = current_app.extensions.get("rpl_services") or {}
    return service_id if service_id in registered else UNKNOWN_SERVICE


# --- OpenAPI ---------------------------------------------------------------------------------


def openapi_paths(components: dict) -> dict:
    """The operations endpoints (and the playground's JSON helpers) for openapi.yaml."""
    components.setdefault(
        "Readiness",
        {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": {"type": "string", "enum": ["ready", "not ready"]},
                "checks": {
                    "type": "object",
                    "properties": {
                        "knowledge": {"type": "string", "enum": ["ok", "not loaded"]},
                        "database": {"type": "string", "enum": ["ok", "unreachable"]},
                    },
                },
            },
        },
    )
    readiness = {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}
    paths = {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "operationId": "healthz",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Alive.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": {"const": "ok"}},
                                }
                            }
                        },
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: knowledge loaded and database reachable",
                "operationId": "readyz",
                "security": [],
                "responses": {
                    "200": {"description": "Ready to answer hooks.", "content": readiness},
                    "503": {"description": "Not ready; `checks` names what failed.", "content": readiness},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "operationId": "metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Counters and histograms per CDS Service; no patient data.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    from .playground import openapi_paths as playground_paths

    paths.update(playground_paths(components))
    return paths
