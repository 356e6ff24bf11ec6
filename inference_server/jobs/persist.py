"""Writing new rows in as few database round trips, and as little Python, as the backend allows."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from sqlalchemy import JSON, Table, insert
from sqlalchemy.orm import Session


@lru_cache(maxsize=32)
def _pg_insert_sql(layout: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """``WITH r0 AS (INSERT ...), r1 AS (INSERT ...) INSERT ...`` for tables and their columns."""
    parts = []
    for i, (table, columns) in enumerate(layout):
        names = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join(f"%(r{i}_{c})s" for c in columns)
        parts.append(f'INSERT INTO "{table}" ({names}) VALUES ({values})')
    ctes = ", ".join(f"r{i} AS ({sql})" for i, sql in enumerate(parts[:-1]))
    return (f"WITH {ctes} " if ctes else "") + parts[-1]


def insert_new_rows(session: Session, rows: list[tuple[type[Any], dict[str, Any]]]) -> None:
    """Insert ``rows`` — (mapped class, column values) pairs, every column set that the database
    does not generate — in the session's transaction.

    On PostgreSQL this is one statement, the rows chained as data-modifying CTEs, sent as plain SQL:
    a submit costs one round trip for its job, outbox message and event, and no ORM unit-of-work
    (foreign keys are checked at the end of the statement, so parents and children may share it).
    Elsewhere (SQLite) each row is a Core insert."""
    if session.get_bind().dialect.name != "postgresql":
        for cls, values in rows:
            session.execute(insert(cls.__table__), [values])
        return
    layout = []
    params: dict[str, Any] = {}
    for i, (cls, values) in enumerate(rows):
        table: Table = cls.__table__
        columns = tuple(name for name in values if name in table.c)
        layout.append((table.name, columns))
        for name in columns:
            value = values[name]
            if value is not None and isinstance(table.c[name].type, JSON):
                value = json.dumps(value)
            params[f"r{i}_{name}"] = value
    session.connection().exec_driver_sql(_pg_insert_sql(tuple(layout)), params)
