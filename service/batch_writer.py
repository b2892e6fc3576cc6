"""A per-process queue of rows written by one background thread in batches.

The card store uses it to record issued cards after the hook has answered. Writing each hook's
cards in its own transaction cost a commit (an fsync) per hook and, with SQLite, made every
worker queue for the database's single write lock: the service's throughput halved. Here the
rows of many hooks share one transaction: a batch is written when it holds `max_rows` rows or
its first row has waited `max_delay_s`, whichever comes first.

Rows stay visible to the process until they are committed (`unwritten`, by the key the `index`
function gives a row), so a later hook of the same process can take them into account without
waiting (select/sign de-duplication). The lookup is by key, not a scan: under load the queue
holds hundreds of rows, and scanning it on every hook cost more than the database reads. `flush`
writes everything queued so far at once (the feedback endpoint and analytics call it before they
read cards); at interpreter exit (a gunicorn worker's graceful stop) the queue is flushed too.

Failure policy is the writer function's: it must not raise (the store logs and drops a batch it
cannot write, as it did per hook before). A raise is logged here and the batch is dropped.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


class BatchWriter:
    def __init__(
        self,
        write: Callable[[list[dict]], None],
        *,
        max_rows: int,
        max_delay_s: float,
        name: str = "rpl-batch-writer",
        index: Callable[[dict], Hashable | None] = lambda _row: None,
    ) -> None:
        self._write = write
        self._index = index
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._name = name
        self._reset()
        # A forked child (a gunicorn worker of a preloaded app) inherits neither the thread nor,
        # safely, the lock: it starts afresh before any of its threads can queue a row. (A check
        # of the pid on every call cost a system call per hook, and two first hooks of a worker
        # could both reset, losing the first one's rows.) Weakly held: a test makes many writers.
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (writer := reference()) and writer._reset())

    def _reset(self) -> None:
        """Fresh state: no queue, no thread, a new lock."""
        self._cond = threading.Condition()
        self._queue: list[dict] = []  # rows not yet taken by the writer thread
        self._unwritten: dict[Hashable, list[dict]] = {}  # index key -> queued or in-flight rows
        self._queued_total = 0  # rows ever queued in this process
        self._done_total = 0  # rows written or given up
        self._urgent = False
        self._first_queued_at = 0.0
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        """Called with the lock held."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            atexit.register(self._flush_at_exit)

    # -- producer side -------------------------------------------------------------------------

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        with self._cond:
            self._ensure_thread()
            was_empty = not self._queue
            if was_empty:
                self._first_queued_at = time.monotonic()
            self._queue.extend(rows)
            self._queued_total += len(rows)
            for row in rows:
                key = self._index(row)
                if key is not None:
                    self._unwritten.setdefault(key, []).append(row)
            # Wake the writer only when it must act: a first row starts its timer, a full batch
            # is due now. Waking it on every row only made threads fight for the GIL.
            if was_empty or len(self._queue) >= self.max_rows:
                self._cond.notify_all()

    def unwritten(self, key: Hashable) -> list[dict]:
        """The rows of this process with this index key that are queued or being written."""
        with self._cond:
            return list(self._unwritten.get(key, ()))

    def flush(self, timeout: float = 5.0) -> bool:
        """Write everything queued so far now; wait at most `timeout` seconds. True when done."""
        with self._cond:
            target = self._queued_total
            if self._done_total >= target:
                return True
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done_total >= target, timeout=timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return self._queued_total - self._done_total

    # -- writer thread -------------------------------------------------------------------------

    def _take_batch(self) -> list[dict]:
        """Block until a batch is due; take it (lock held by the caller)."""
        while True:
            if self._queue:
                if self._urgent or len(self._queue) >= self.max_rows:
                    break
                remaining = self._first_queued_at + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            else:
                self._urgent = False
                self._cond.wait()
        batch = self._queue[: self.max_rows]
        del self._queue[: self.max_rows]
        if self._queue:
            self._first_queued_at = time.monotonic()
        else:
            self._urgent = False
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._take_batch()
            self._write_batch(batch)

    def _write_batch(self, batch: list[dict]) -> None:
        try:
            self._write(batch)
        except Exception:  # noqa: BLE001 - the writer thread must survive any bug in a batch
            log.exception("writing a batch of %d rows failed; they are lost", len(batch))
        finally:
            with self._cond:
                self._done_total += len(batch)
                self._forget(batch)
                self._cond.notify_all()

    def _forget(self, batch: list[dict]) -> None:
        """Drop written (or given-up) rows from the index (lock held)."""
        done = {id(row) for row in batch}
        for key in {self._index(row) for row in batch} - {None}:
            left = [row for row in self._unwritten.get(key, ()) if id(row) not in done]
            if left:
                self._unwritten[key] = left
            else:
                self._unwritten.pop(key, None)

    def _flush_at_exit(self) -> None:
        # The writer thread is a daemon and may be mid-batch: let it finish, then write the rest
        # here if it cannot (it is gone once the interpreter has begun to stop it).
        if not self.flush(timeout=5.0):
            with self._cond:
                rest, self._queue = self._queue, []
            if rest:
                self._write_batch(rest)
