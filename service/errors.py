"""Every non-2xx answer carries a FHIR OperationOutcome naming the problem (CDS Hooks 3.0 advice,
harmless under 2.0). Clients never see a stack trace, and no client input can cause a 500."""

from __future__ import annotations

import logging

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# HTTP status -> OperationOutcome.issue.code (http://hl7.org/fhir/issue-type)
_ISSUE_CODE_BY_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    412: "processing",
    413: "too-costly",
    415: "not-supported",
    429: "throttled",
    503: "transient",
}


class ApiError(Exception):
    """An error the client should see, with its HTTP status and an OperationOutcome body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        expression: list[str] | None = None,
        issues: list[dict] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.expression = expression
        self.issues = issues
        self.headers = headers or {}


def operation_outcome(status: int, message: str, expression: list[str] | None = None) -> dict:
    issue: dict = {
        "severity": "error",
        "code": _ISSUE_CODE_BY_STATUS.get(status, "exception"),
        "details": {"text": message},
    }
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(
    status: int, body: dict, headers: dict[str, str] | None = None
) -> Response:
    response = Response(json.dumps(body), status=status, mimetype=FHIR_JSON)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def api_error_response(error: ApiError) -> Response:
    if error.issues:
        body = {"resourceType": "OperationOutcome", "issue": error.issues}
    else:
        body = operation_outcome(error.status, error.message, error.expression)
    return outcome_response(error.status, body, error.headers)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, api_error_response)

    @app.errorhandler(HTTPException)
    def http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            404: "No such endpoint. CDS Services are listed at /cds-services.",
            405: f"Method {_method()} is not allowed here.",
            413: "Request body is larger than the configured limit "
            f"({app.config.get('RPL_MAX_BODY_BYTES')} bytes).",
        }
        message = messages.get(status) or error.description or error.name
        headers = {}
        if status == 405 and getattr(error, "valid_methods", None):
            headers["Allow"] = ", ".join(error.valid_methods)
        return outcome_response(status, operation_outcome(status, message), headers)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        # A bug on our side. The client gets a generic OperationOutcome; the log gets the
        # traceback (which never contains request bodies or tokens: we log only the exception).
        log.exception("unhandled error: %s", type(error).__name__)
        return outcome_response(
            500, operation_outcome(500, "Internal error in the CDS service; see the service log.")
        )


def _method() -> str:
    from flask import request

    return request.method
