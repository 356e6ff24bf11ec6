"""Writing new rows in as few database round trips, and as little Python, as the backend allows."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from sqlalchemy import JSON, Table, insert, update
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
        params.update({f"r{i}_{name}": _plain(table, name, values[name]) for name in columns})
    session.connection().exec_driver_sql(_pg_insert_sql(tuple(layout)), params)


@lru_cache(maxsize=64)
def _pg_update_sql(
    table: str,
    where: tuple[str, ...],
    columns: tuple[str, ...],
    layout: tuple[tuple[str, tuple[tuple[str, str], ...]], ...],
    notify: bool,
) -> str:
    """``WITH u AS (UPDATE ... RETURNING 1), r0 AS (INSERT ... SELECT ... FROM u) SELECT 1 FROM u``:
    the rows are inserted only when the update matched."""
    sets = ", ".join(f'"{c}" = %(u_{c})s' for c in columns)
    conds = " AND ".join(f'"{c}" = %(w_{c})s' for c in where)
    ctes = [f'u AS (UPDATE "{table}" SET {sets} WHERE {conds} RETURNING 1)']
    for i, (name, cols) in enumerate(layout):
        names = ", ".join(f'"{c}"' for c, _ in cols)
        # Typed: in INSERT ... SELECT the target columns do not type the parameters.
        values = ", ".join(f"CAST(%(r{i}_{c})s AS {sql_type})" for c, sql_type in cols)
        ctes.append(f'r{i} AS (INSERT INTO "{name}" ({names}) SELECT {values} FROM u)')
    tail = ", pg_notify(%(n_channel)s, %(n_payload)s)" if notify else ""
    return f"WITH {', '.join(ctes)} SELECT 1{tail} FROM u"


@lru_cache(maxsize=256)
def _sql_type(table: Table, name: str, dialect: Any) -> str:
    return str(table.c[name].type.compile(dialect=dialect))


def _plain(table: Table, name: str, value: Any) -> Any:
    if value is not None and isinstance(table.c[name].type, JSON):
        return json.dumps(value)
    return value


def update_with_rows(
    session: Session,
    cls: type[Any],
    where: dict[str, Any],
    values: dict[str, Any],
    rows: list[tuple[type[Any], dict[str, Any]]] = (),  # type: ignore[assignment]
    *,
    notify: tuple[str, str] | None = None,
) -> bool:
    """Update the row of ``cls`` matching ``where`` (column equalities) and, only if it matched,
    insert ``rows`` and send ``notify`` (channel, payload) at commit; return whether it matched.

    On PostgreSQL this is one statement, so a conditional transition with its event and outputs costs
    one round trip and no ORM unit-of-work. Elsewhere (SQLite, which has no NOTIFY) Core statements."""
    table: Table = cls.__table__
    if session.get_bind().dialect.name != "postgresql":
        conds = [table.c[k] == v for k, v in where.items()]
        result = session.execute(update(table).where(*conds).values(**values))
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        for row_cls, row_values in rows:
            session.execute(insert(row_cls.__table__), [row_values])
        return True
    params: dict[str, Any] = {f"w_{k}": v for k, v in where.items()}
    params.update({f"u_{k}": _plain(table, k, v) for k, v in values.items()})
    layout = []
    dialect = session.get_bind().dialect
    for i, (row_cls, row_values) in enumerate(rows):
        row_table: Table = row_cls.__table__
        columns = tuple(name for name in row_values if name in row_table.c)
        layout.append((row_table.name, tuple((c, _sql_type(row_table, c, dialect)) for c in columns)))
        params.update({f"r{i}_{c}": _plain(row_table, c, row_values[c]) for c in columns})
    if notify:
        params["n_channel"], params["n_payload"] = notify
    sql = _pg_update_sql(table.name, tuple(where), tuple(values), tuple(layout), notify is not None)
    return session.connection().exec_driver_sql(sql, params).first() is not None
