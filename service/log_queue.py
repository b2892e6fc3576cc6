"""Log lines are written to stderr by a background thread, not by the request threads.

Every hook call logs one line (service/request_log.py). Written in the request thread, that line
takes the handler's lock and a write system call; with four threads per gunicorn worker the
threads queued on that lock and on the GIL hand-off around the write (measured with py-spy under
the benchmark: about a tenth of a worker's busy time waiting in `Handler.acquire`). Here the
request thread only formats the record and puts it on a queue (the redaction filter still runs
first, in the request thread); a listener thread writes it.

The listener is per process: a gunicorn fork gets a fresh queue and listener, and the queue is
drained at interpreter exit, so a graceful stop loses no line.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
import threading


class BackgroundStderr:
    def __init__(self, fmt: str = "%(message)s") -> None:
        self.stream_handler = logging.StreamHandler(sys.stderr)
        self.stream_handler.setFormatter(logging.Formatter(fmt))
        self.handler = logging.handlers.QueueHandler(queue.SimpleQueue())
        self._lock = threading.Lock()
        self._listener: logging.handlers.QueueListener | None = None
        self._start()
        os.register_at_fork(after_in_child=self._start_in_child)
        atexit.register(self.stop)

    def _start(self) -> None:
        self._listener = logging.handlers.QueueListener(self.handler.queue, self.stream_handler)
        self._listener.start()

    def _start_in_child(self) -> None:
        # The parent's listener thread does not exist here; its queue may hold the parent's
        # lines (the parent writes those) and must not be shared.
        self._lock = threading.Lock()
        self.handler.queue = queue.SimpleQueue()
        self._start()

    def stop(self) -> None:
        """Write what is queued and stop the listener (at exit)."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None and listener._thread is not None:
            listener.stop()


_background: BackgroundStderr | None = None


def background_stderr_handler() -> logging.Handler:
    """The process's queue handler (one listener per process, however many apps are built)."""
    global _background
    if _background is None:
        _background = BackgroundStderr()
    return _background.handler
