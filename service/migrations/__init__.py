"""Alembic migrations for every table on `service.db.metadata` (cards, feedback, JWT replay).

`upgrade_to_head(engine)` runs at start-up (service.store.init_app, once per process; under
gunicorn with preload_app it runs in the master before the workers fork). Concurrent start-ups
are serialised: PostgreSQL by a session-level advisory lock, SQLite by an exclusive `flock` on a
lock file next to the database. On PostgreSQL the whole upgrade is one transaction (DDL is
transactional there), so a failed upgrade leaves the previous schema intact.

Developers: `alembic -c service/migrations/alembic.ini revision -m "..."` writes a new revision;
keep the Table definitions in service/store.py in step (tests/test_migrations.py checks).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent
# pg_advisory_lock key: the bytes of "rpl-cds" as a 64-bit integer.
ADVISORY_LOCK_KEY = int.from_bytes(b"rpl-cds", "big")


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    upgrade(engine, "head")


def upgrade(engine: Engine, revision: str) -> None:
    """Upgrade to `revision` under the migration lock (no-op when already there)."""
    # Alembic announces every step at INFO; one line of our own is enough.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with _migration_lock(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        connection.commit()
        with connection.begin():
            command.upgrade(alembic_config(connection), revision)
        after = MigrationContext.configure(connection).get_current_revision()
        connection.commit()
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY})")
            connection.commit()
            try:
                yield connection
            finally:
                _release_advisory_lock(connection)
        return
    with _file_lock(_sqlite_lock_path(engine)), engine.connect() as connection:
        yield connection


def _release_advisory_lock(connection: Connection) -> None:
    try:
        connection.rollback()
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})")
        connection.commit()
    except Exception:  # noqa: BLE001 - a lost connection releases the lock by itself
        connection.invalidate()


def _sqlite_lock_path(engine: Engine) -> str | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database + ".migration-lock"


@contextmanager
def _file_lock(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - held for the duration of the upgrade
    except OSError:
        # The database directory is missing or unwritable: connecting will fail and say so.
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
