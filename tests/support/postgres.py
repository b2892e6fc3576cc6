"""Throw-away databases on the local PostgreSQL (127.0.0.1:5432, trust auth), for the storage
tests and the load test: each run gets a database of its own, dropped (forcibly) afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

PG_HOST = "127.0.0.1"
PG_PORT = 5432


class PostgresUnavailable(RuntimeError):
    pass


def admin_connection():
    """(autocommit connection to the `postgres` database, user name), or (None, None)."""
    import psycopg

    for user in ("root", "postgres"):
        try:
            connection = psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", connect_timeout=2,
                autocommit=True,
            )
            return connection, user
        except psycopg.Error:
            continue
    return None, None


@contextlib.contextmanager
def absent_database(prefix: str) -> Iterator[tuple[str, Callable[[], object]]]:
    """Yields (url, create): a database named `<prefix>_<random>` that does not exist until
    create() is called; dropped afterwards. Raises PostgresUnavailable."""
    connection, user = admin_connection()
    if connection is None:
        raise PostgresUnavailable(f"PostgreSQL is not running at {PG_HOST}:{PG_PORT} (trust auth expected)")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        yield (
            f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}",
            lambda: connection.execute(f'CREATE DATABASE "{name}"'),
        )
    finally:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """Yields the URL of a new, empty database; dropped afterwards. Raises PostgresUnavailable."""
    with absent_database(prefix) as (url, create):
        create()
        yield url
