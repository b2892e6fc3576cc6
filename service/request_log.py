"""One structured JSON log line per request, and nothing identifying anywhere in the log.

The line (logger `rpl_cds.request`) holds what operations need: route, status, duration, the CDS
Service and hookInstance, the card topics, the prefetch keys that had to be fetched, the verified
client (iss, tenant) and, for a refused request, why (the client never sees that reason). It never
holds a JWT, an access token, a patient identifier, a query string or a request body.

Libraries that would log identifying data are kept quiet here too:
- Werkzeug's development server logs each request line including the query string: the query is
  cut from those records.
- urllib3 logs every outgoing URL at DEBUG level; FHIR queries carry the patient id in the URL,
  so urllib3 logs from WARNING up only.
A last safety net on the root handlers masks anything shaped like a JWT or a Bearer credential.
"""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, request

from .json_codec import json_text

REQUEST_LOGGER = "rpl_cds.request"
log = logging.getLogger(REQUEST_LOGGER)

_QUERY = re.compile(r"\?[^\s\"']*")
_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


def init_app(app: Flask) -> None:
    # Registered before the authentication hook so that the duration includes the JWT check.
    app.before_request(_start_timer)
    app.after_request(_log_request)
    quiet_identifying_loggers()
    install_redaction(logging.getLogger())


def _start_timer() -> None:
    g.rpl_request_started = time.perf_counter()


def _log_request(response: Response) -> Response:
    record = request_record(response.status_code)
    status = response.status_code
    level = logging.WARNING if status in (401, 403) or status >= 500 else logging.INFO
    log.log(level, json_text(record))
    return response


def request_record(status: int) -> dict:
    """The fields of the request line; only values that exist (no nulls)."""
    started = g.get("rpl_request_started")
    rule = request.url_rule
    record: dict = {
        "event": "request",
        "method": request.method,
        # The route template, not the raw path: a path under a protected prefix could hold anything.
        "route": rule.rule if rule is not None else "(no route)",
        "status": status,
    }
    if started is not None:
        record["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
    optional = {
        "service": g.get("rpl_service_id"),
        "hookInstance": g.get("rpl_hook_instance"),
        "cards": g.get("rpl_card_topics"),
        "fetched": g.get("rpl_fetched_keys"),
        "auth_ms": g.get("rpl_auth_ms"),
        "auth_failure": g.get("rpl_auth_failure"),
    }
    caller = g.get("rpl_caller")
    if caller is not None:
        optional["client"] = caller.iss
        optional["tenant"] = caller.tenant
    record.update({key: value for key, value in optional.items() if value is not None})
    return record


# ------------------------------------------------------------------------------------------
# Library loggers and the redaction safety net


class _WerkzeugQueryFilter(logging.Filter):
    """Werkzeug's request line is '"GET /path?query HTTP/1.1" 200 -': keep it, cut the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY.sub("?(query removed)", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _QUERY.sub("?(query removed)", record.msg)
        return True


class RedactingFilter(logging.Filter):
    """Masks JWT-shaped strings and Bearer credentials in any record reaching a handler.

    The code never logs such values; this catches a mistake (or a library) before it reaches disk.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact(text: str) -> str:
    text = _JWT_SHAPE.sub("(jwt removed)", text)
    return _BEARER.sub(r"\1(credential removed)", text)


_werkzeug_filter = _WerkzeugQueryFilter()
_redacting_filter = RedactingFilter()


def quiet_identifying_loggers() -> None:
    werkzeug = logging.getLogger("werkzeug")
    if _werkzeug_filter not in werkzeug.filters:
        werkzeug.addFilter(_werkzeug_filter)
    # FHIR query URLs (with patient ids) appear in urllib3's DEBUG lines.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def install_redaction(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if _redacting_filter not in handler.filters:
            handler.addFilter(_redacting_filter)
