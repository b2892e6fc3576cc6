"""JWT replay protection: every (iss, jti) is accepted once, by all workers and instances together.

The store is the table `jwt_replay` in the service database (SQLite by default, PostgreSQL in
production), so every gunicorn worker and every replica behind a load balancer shares it. A row
holds only a SHA-256 digest of iss + jti and the time after which the token is expired anyway;
never the token. "Insert if absent" is the primary key: of two workers racing on the same jti the
database lets exactly one INSERT commit, the other gets an IntegrityError and the request a 401.
Expired rows are deleted now and then by whichever process notices first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Engine, Index, String, Table, delete, insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .db import SQLITE_BUSY_TIMEOUT_MS, metadata, set_busy_timeout

log = logging.getLogger(__name__)

# Created by service/migrations (revision 0001); keep the two in step.
jwt_replay_table = Table(
    "jwt_replay",
    metadata,
    Column("key_hash", String(64), primary_key=True),  # sha256(iss \0 jti), hex
    Column("expires_at", DateTime(timezone=True), nullable=False),  # after it, exp has passed
    Index("ix_jwt_replay_expires_at", "expires_at"),
)

PURGE_INTERVAL_SECONDS = 60.0


class ReplayStoreUnavailable(Exception):
    """The database cannot be reached: the request cannot be checked for replay (fail closed)."""


class ReplayStore:
    def __init__(
        self,
        engine: Callable[[], Engine],
        *,
        wall_clock: Callable[[], float] = time.time,
        purge_interval_seconds: float = PURGE_INTERVAL_SECONDS,
    ) -> None:
        self._engine = engine  # a factory: engines are per process (gunicorn forks after load)
        self._wall_clock = wall_clock
        self._purge_interval = purge_interval_seconds
        self._last_purge = 0.0
        self._schema_ready_in: int | None = None  # pid that has made sure the schema is current
        self._lock = threading.Lock()

    def claim(self, key_hash: str, expires_at: int) -> bool:
        """True the first time `key_hash` is presented (and remember it until `expires_at`,
        epoch seconds)."""
        expiry = datetime.fromtimestamp(expires_at, UTC)
        try:
            engine = self._engine()
            self._ensure_schema(engine)
            try:
                with engine.begin() as connection:
                    if engine.dialect.name == "sqlite":
                        # The pooled connection may carry a hook's short lock wait.
                        set_busy_timeout(connection.connection, SQLITE_BUSY_TIMEOUT_MS)
                    connection.execute(
                        insert(jwt_replay_table).values(key_hash=key_hash, expires_at=expiry)
                    )
            except IntegrityError:
                return False
            self._maybe_purge(engine)
            return True
        except SQLAlchemyError as error:
            log.error("JWT replay store unavailable: %s", type(error).__name__)
            raise ReplayStoreUnavailable() from error

    def _ensure_schema(self, engine: Engine) -> None:
        # The migrations own the schema (service.store runs them at start-up); running them here
        # too, once per process, keeps the replay check working if the store is not installed
        # or the database was unreachable at start-up. A no-op when already at head.
        pid = os.getpid()
        if self._schema_ready_in == pid:
            return
        with self._lock:
            if self._schema_ready_in == pid:
                return
            from .migrations import upgrade_to_head

            upgrade_to_head(engine)
            self._schema_ready_in = pid

    def _maybe_purge(self, engine: Engine) -> None:
        now = self._wall_clock()
        if now - self._last_purge < self._purge_interval:
            return
        self._last_purge = now
        with engine.begin() as connection:
            result = connection.execute(
                delete(jwt_replay_table).where(
                    jwt_replay_table.c.expires_at < datetime.fromtimestamp(now, UTC)
                )
            )
        if result.rowcount:
            log.debug("JWT replay store: %d expired entries removed", result.rowcount)
