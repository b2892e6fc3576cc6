"""The service under test: gunicorn with the project's gunicorn.conf.py on 127.0.0.1 (started the
way tests/test_gunicorn.py starts it), and its database: a fresh SQLite file, or with --postgres a
database created for the run on 127.0.0.1:5432 (trust auth) and dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from service.db import sqlalchemy_url

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Gunicorn:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    started_in_s: float

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (graceful), as a deploy would; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(workdir: Path, database_url: str, workers: int, threads: int | None = None,
                   timeout_s: float = 60) -> Gunicorn:
    port = free_port()
    env = {
        **os.environ,
        "RPL_CDS_AUTH": "disabled",  # loopback only; the JWT check has its own benchmarks
        "RPL_CDS_DATABASE_URL": database_url,
        "RPL_CDS_BIND": f"127.0.0.1:{port}",
        "RPL_CDS_WORKERS": str(workers),
        "RPL_CDS_PSEUDONYM_SECRET": "loadtest-pseudonym-secret-0123456789",
        "RPL_CDS_LOG_LEVEL": "WARNING",  # one line per request would be most of the disk I/O
    }
    if threads:
        env["RPL_CDS_THREADS"] = str(threads)
    log_path = workdir / f"gunicorn-{port}.log"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    started = time.monotonic()
    with open(log_path, "w") as log:  # a file, not a pipe: an unread pipe blocks the workers
        proc = subprocess.Popen([str(gunicorn), "-c", "gunicorn.conf.py", "service:create_app()"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base}/cds-services", timeout=1) as response:
                if response.status == 200:
                    return Gunicorn(proc, base, log_path, time.monotonic() - started)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gunicorn did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def database(postgres: bool, workdir: Path) -> Iterator[str]:
    """The database URL for the run (SQLite file in `workdir`, or a fresh PostgreSQL database)."""
    if not postgres:
        yield f"sqlite:///{workdir / 'loadtest.sqlite'}"
        return
    from tests.support.postgres import scratch_database

    with scratch_database("rplcds_load") as url:
        yield url


def _engine(url: str):
    return create_engine(sqlalchemy_url(url))


def stored_feedback_stamps(url: str) -> list[str]:
    """outcome_at of every feedback row, formatted as the load test sent it (UTC, milliseconds)."""
    from datetime import UTC, datetime

    engine = _engine(url)
    try:
        with engine.connect() as connection:
            values = [row[0] for row in connection.execute(text("SELECT outcome_at FROM rpl_feedback"))]
    finally:
        engine.dispose()
    stamps = []
    for value in values:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        stamps.append(value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    return stamps


def count_rows(url: str, table: str) -> int:
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()
