"""The card writer's queue (service/batch_writer.py): many hooks' cards in one transaction, no
card lost at a flush or at exit, and a failing batch does not stop the writer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from service.batch_writer import BatchWriter


class RecordingSink:
    def __init__(self, fail_first: bool = False):
        self.batches: list[list[dict]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, rows: list[dict]) -> None:
        with self.lock:
            if self.fail_first:
                self.fail_first = False
                raise RuntimeError("database said no")
            self.batches.append(list(rows))

    @property
    def rows(self) -> list[dict]:
        return [row for batch in self.batches for row in batch]


def test_rows_of_many_adds_within_the_delay_share_one_batch():
    sink = RecordingSink()
    writer = BatchWriter(sink, max_rows=100, max_delay_s=1.0)  # the check below must come first
    for n in range(10):
        writer.add([{"n": n}])
    assert sink.batches == []  # nothing written before the delay has passed
    deadline = time.monotonic() + 5
    while writer.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.batches == [[{"n": n} for n in range(10)]]


def test_a_full_batch_is_written_without_waiting_for_the_delay():
    sink = RecordingSink()
    writer = BatchWriter(sink, max_rows=3, max_delay_s=60)
    writer.add([{"n": 1}, {"n": 2}])
    writer.add([{"n": 3}, {"n": 4}])
    deadline = time.monotonic() + 5
    while writer.pending > 1 and time.monotonic() < deadline:  # counted after the write returns
        time.sleep(0.01)
    assert sink.batches == [[{"n": 1}, {"n": 2}, {"n": 3}]]
    assert writer.pending == 1


def test_flush_writes_everything_queued_now_and_unwritten_rows_are_visible_until_then():
    sink = RecordingSink()
    writer = BatchWriter(sink, max_rows=100, max_delay_s=60, index=lambda row: row["patient"])
    writer.add([{"patient": "a"}, {"patient": "b"}, {"patient": "a", "n": 2}])
    assert writer.unwritten("a") == [{"patient": "a"}, {"patient": "a", "n": 2}]
    assert writer.unwritten("c") == []
    assert writer.flush(timeout=5)
    assert sink.rows == [{"patient": "a"}, {"patient": "b"}, {"patient": "a", "n": 2}]
    assert writer.unwritten("a") == [] and writer.unwritten("b") == []
    assert writer.pending == 0


def test_a_batch_that_fails_is_dropped_and_the_writer_goes_on():
    sink = RecordingSink(fail_first=True)
    writer = BatchWriter(sink, max_rows=100, max_delay_s=60)
    writer.add([{"n": 1}])
    assert writer.flush(timeout=5)  # given up, not hanging
    writer.add([{"n": 2}])
    assert writer.flush(timeout=5)
    assert sink.rows == [{"n": 2}]


def test_rows_still_queued_at_interpreter_exit_are_written(tmp_path):
    out = tmp_path / "written.txt"
    script = textwrap.dedent(
        f"""
        from service.batch_writer import BatchWriter
        def write(rows):
            with open({str(out)!r}, "a") as f:
                f.writelines(str(r["n"]) + "\\n" for r in rows)
        writer = BatchWriter(write, max_rows=1000, max_delay_s=3600)
        writer.add([{{"n": n}} for n in range(50)])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert out.read_text().split() == [str(n) for n in range(50)]


def test_a_forked_worker_starts_with_its_own_queue_and_writer_thread():
    """gunicorn forks its workers from a preloaded app: a child must not see the parent's
    queued rows, nor wait on the parent's thread, and must write its own rows."""
    import os

    sink = RecordingSink()
    writer = BatchWriter(sink, max_rows=100, max_delay_s=30, index=lambda row: row["key"])
    writer.add([{"key": "parent", "n": 1}])  # queued in the parent, its thread waiting 30 s
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        ok = writer.pending == 0 and writer.unwritten("parent") == []
        writer.add([{"key": "child", "n": 2}])
        ok = ok and writer.unwritten("child") == [{"key": "child", "n": 2}]
        ok = ok and writer.flush(timeout=5) and sink.rows == [{"key": "child", "n": 2}]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert writer.unwritten("parent") == [{"key": "parent", "n": 1}]  # the parent's row is untouched
    assert writer.flush(timeout=5)
    assert sink.rows == [{"key": "parent", "n": 1}]
