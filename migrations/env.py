"""Alembic environment: the URL comes from the same Settings object the services use."""

from __future__ import annotations

from alembic import context

import webhooks.tables  # noqa: F401  (registers the webhook tables on the shared metadata)
from inference_server.db import Base, DatabaseTimeouts, make_database
from inference_server.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # DDL on a large table may rightly run for minutes: no statement or idle limits here.
    engine = make_database(_url(), timeouts=DatabaseTimeouts(statement=0, idle_in_transaction=0))
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # Batch mode lets the same migrations alter tables on SQLite.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
