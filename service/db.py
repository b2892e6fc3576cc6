"""Database access shared by every part that persists something (JWT replay store, cards,
feedback). SQLite in the instance folder by default; PostgreSQL via RPL_CDS_DATABASE_URL.

Tables are declared on `metadata` by the modules that own them; the schema itself is created and
upgraded by the migrations (service/migrations), never by `metadata.create_all` in production.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from flask import Flask, current_app
from sqlalchemy import Engine, MetaData, create_engine, event

metadata = MetaData()

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


# SQLite's lock wait for a pooled connection unless its user sets another (set_busy_timeout).
SQLITE_BUSY_TIMEOUT_MS = 5000


def set_busy_timeout(connection: Any, lock_wait_ms: int) -> None:
    """SQLite's lock wait on a pooled connection (SQLAlchemy's pool proxy, or the Connection's
    `.connection`). The setting stays with the connection when it goes back to the pool, so each
    user sets the wait it needs; the PRAGMA is sent only when the value changes (a statement per
    use cost as much as the hook's own queries)."""
    info = connection.info
    if info.get("busy_timeout_ms") != lock_wait_ms:
        connection.driver_connection.execute(f"PRAGMA busy_timeout={int(lock_wait_ms)}")
        info["busy_timeout_ms"] = lock_wait_ms


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy names the psycopg 3 driver explicitly; accept the plain PostgreSQL forms too."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def database_url(app: Flask) -> str:
    configured = app.config["RPL_SETTINGS"].database_url
    if configured:
        return sqlalchemy_url(configured)
    return "sqlite:///" + os.path.join(app.instance_path, "rpl-cds.sqlite")


def engine_for(app: Flask | None = None) -> Engine:
    """One engine per process and URL (engines must not cross a gunicorn fork)."""
    app = app or current_app._get_current_object()
    url = database_url(app)
    key = (os.getpid(), url)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(url)
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            # No pool_pre_ping: a SQLite "connection" is a file handle, a ping only costs time.
            # `timeout` is SQLite's busy_timeout for a new connection.
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, record):  # pragma: no cover - driver callback
            cursor = dbapi_connection.cursor()
            # WAL: readers do not block the writer; FULL sync: an acknowledged commit survives
            # a power loss (feedback is acknowledged only after commit).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()
            record.info["busy_timeout_ms"] = SQLITE_BUSY_TIMEOUT_MS

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=2,
        # A silent network (no answer, no reset) is noticed in seconds, not after TCP's minutes.
        connect_args={"connect_timeout": 2, "keepalives": 1, "keepalives_idle": 5,
                      "keepalives_interval": 2, "keepalives_count": 2, "tcp_user_timeout": 8000},
    )
