"""Declarative base, engine and session factories."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, URL, DateTime, Engine, MetaData, create_engine, event, make_url
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.types import TypeDecorator

from inference_server.db.timeouts import DatabaseTimeouts, connection_class, install_wait_callback

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime()}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def make_database(
    url: str, *, pool_size: int = 10, pre_ping: bool = True, timeouts: DatabaseTimeouts | None = None
) -> Engine:
    """An engine tuned per backend: SQLite gets WAL and a busy timeout so threads of `up` can share it;
    PostgreSQL gets the bounded waits of ``timeouts`` (default: the settings' defaults).

    ``pre_ping=False`` saves a round trip per checkout on hot request paths; a connection the
    database dropped then fails one request (503) and is replaced."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    timeouts = timeouts or DatabaseTimeouts()
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        pool_timeout=timeouts.pool if timeouts.pool > 0 else None,
        connect_args=_postgres_connect_args(make_url(url), timeouts),
    )


def _postgres_connect_args(url: URL, timeouts: DatabaseTimeouts) -> dict[str, Any]:
    """psycopg2's connection arguments for ``timeouts`` (other drivers get the pool timeout only);
    a parameter the URL sets itself keeps the URL's value."""
    if url.get_driver_name() != "psycopg2":
        return {}
    args = {k: v for k, v in timeouts.libpq_params().items() if k not in url.query}
    options = [str(url.query["options"])] if "options" in url.query else []
    if options or timeouts.server_options():
        args["options"] = " ".join(options + timeouts.server_options())
    install_wait_callback()
    args["connection_factory"] = connection_class(timeouts)
    return args


def make_session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def listening_connection(engine: Engine, channel: str, *more: str) -> Any:
    """A pooled connection of its own, in autocommit, LISTENing on ``channel`` and ``more`` (PostgreSQL). The
    caller invalidates it when done: a LISTENing session must not go back to the pool."""
    raw = engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in (channel, *more):
                cur.execute(f"LISTEN {name}")
    except BaseException:
        raw.invalidate()
        raise
    return raw
