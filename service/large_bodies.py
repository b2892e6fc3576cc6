"""At most N hook requests with a large body are worked on at once per worker process.

A 10,000-resource prefetch (about 7 MB of JSON) becomes about 120 MB of Python objects while the
hook runs. Four gthread threads working on four such bodies at once gain nothing (the work is CPU
under one GIL) and hold four times the memory: the benchmark measured a worker's peak VmRSS
313 MB with four at once and 205 MB with one (bench/README.md). A hook with a larger body than
LARGE_BODY_BYTES waits in `LargeBodyGate.turn`, before its body is read (it stays in the socket
buffer), for a turn; small hooks never wait. The hook view takes the turn after the checks that
need no body (the JWT, the service id, the media type, a declared size over the limit), so those
answers never wait behind another large hook. A request that cannot get a turn within its wait
limit is answered 503 with Retry-After, as an overloaded service should.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ApiError
from .malloc_tuning import give_back_free_memory

LARGE_BODY_BYTES = 1024 * 1024
WAIT_LIMIT_S = 10.0
BUSY_MESSAGE = "The service is busy with other large requests; try again shortly."


class LargeBodyGate:
    def __init__(self, at_once: int, wait_limit_s: float = WAIT_LIMIT_S) -> None:
        self.wait_limit_s = wait_limit_s
        self._turns = threading.BoundedSemaphore(at_once)

    @contextmanager
    def turn(self, environ: dict) -> Iterator[None]:
        """Hold a turn while the block runs if the request's body is large; raise ApiError 503
        when none comes free in time. The block must leave no reference to the parsed body
        behind: its memory is handed back to the system when the turn ends."""
        if not _is_large(environ):
            yield
            return
        if not self._turns.acquire(timeout=self.wait_limit_s):
            raise ApiError(503, BUSY_MESSAGE, headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self._turns.release()
            give_back_free_memory()


def _is_large(environ: dict) -> bool:
    length = environ.get("CONTENT_LENGTH")
    if length:
        return length.isdigit() and int(length) > LARGE_BODY_BYTES
    # A chunked body has no declared length: it may be large.
    return "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
