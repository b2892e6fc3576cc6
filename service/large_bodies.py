"""At most N requests with a large body are worked on at once per worker process.

A 10,000-resource prefetch (about 7 MB of JSON) becomes about 120 MB of Python objects while the
hook runs. Four gthread threads working on four such bodies at once gain nothing (the work is CPU
under one GIL) and hold four times the memory: the benchmark measured a worker's peak VmRSS
313 MB with four at once and 205 MB with one (bench/README.md). Requests with a larger body than
LARGE_BODY_BYTES wait here, before their body is read (it stays in the socket buffer), for a
turn; small hooks never wait. A request that cannot get a turn within its wait limit is answered
503 with Retry-After, as an overloaded service should.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable

from .errors import operation_outcome
from .malloc_tuning import give_back_free_memory

LARGE_BODY_BYTES = 1024 * 1024
WAIT_LIMIT_S = 10.0


class LargeBodyGate:
    def __init__(self, wsgi_app: Callable, at_once: int, wait_limit_s: float = WAIT_LIMIT_S) -> None:
        self.wsgi_app = wsgi_app
        self.wait_limit_s = wait_limit_s
        self._turns = threading.BoundedSemaphore(at_once)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not _is_large(environ):
            return self.wsgi_app(environ, start_response)
        if not self._turns.acquire(timeout=self.wait_limit_s):
            return _busy(start_response)
        try:
            # The response is a JSON body built in full by Flask: the turn ends with it.
            result = self.wsgi_app(environ, start_response)
            try:
                return list(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        finally:
            self._turns.release()
            # The hook's objects are freed now; hand the pages back rather than keep the peak.
            give_back_free_memory()


def _is_large(environ: dict) -> bool:
    length = environ.get("CONTENT_LENGTH")
    if length:
        return length.isdigit() and int(length) > LARGE_BODY_BYTES
    # A chunked body has no declared length: it may be large.
    return "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


# Answered before Flask sees the request (so neither the request log nor the metrics count it).
_BUSY_BODY = json.dumps(
    operation_outcome(503, "The service is busy with other large requests; try again shortly.")
).encode()


def _busy(start_response: Callable) -> list[bytes]:
    body = _BUSY_BODY
    start_response(
        "503 Service Unavailable",
        [("Content-Type", "application/fhir+json"), ("Content-Length", str(len(body))), ("Retry-After", "1")],
    )
    return [body]
