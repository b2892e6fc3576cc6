"""Alembic environment. The service passes its own connection (service.migrations.upgrade);
the `alembic` command line builds one from sqlalchemy.url or RPL_CDS_DATABASE_URL."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from service.db import metadata, sqlalchemy_url

# Import the modules that declare tables, so autogenerate sees all of them.
import service.store  # noqa: F401

try:
    import service.replay  # noqa: F401  (the JWT replay store, when present)
except ModuleNotFoundError as error:  # pragma: no cover - depends on the build stage
    if error.name != "service.replay":
        raise

config = context.config
target_metadata = metadata


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("RPL_CDS_DATABASE_URL")
    if not url:
        raise SystemExit("set sqlalchemy.url or RPL_CDS_DATABASE_URL")
    return sqlalchemy_url(url)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = create_engine(_url())
    with engine.connect() as connection:
        _configure_and_run(connection)
        connection.commit()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
