"""Writing new rows in as few database round trips as the backend allows, as SQLAlchemy Core
statements.

On PostgreSQL a submit (job, outbox message, event) is one INSERT with the other rows chained as
data-modifying CTEs, and a worker's transition (the conditional job update with its outputs, event
and NOTIFY) is one statement whose inserts read from the update's RETURNING: they happen only when
the update matched. Foreign keys are checked at the end of the statement, so parents and children
may share it. Elsewhere (SQLite) each row is its own statement.

These run between a GPU finishing one job and starting the next, and hundreds of times a second in
the API, so each statement is built once per shape (tables and columns) with named bind parameters
and reused: only the parameters are made per call (see benchmarks/persist.py)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Executable, Table, bindparam, cast, func, insert, literal_column, select, update
from sqlalchemy.orm import Session

Rows = Sequence[tuple[type[Any], dict[str, Any]]]
Shape = tuple[tuple[Table, tuple[str, ...]], ...]


def _shape(rows: Rows) -> Shape:
    return tuple(
        (cls.__table__, tuple(name for name in values if name in cls.__table__.c)) for cls, values in rows
    )


def _params(shape: Shape, rows: Rows, prefix: str = "r") -> dict[str, Any]:
    return {
        f"{prefix}{i}_{name}": values[name]
        for i, ((_, names), (_, values)) in enumerate(zip(shape, rows, strict=True))
        for name in names
    }


def _insert(table: Table, names: tuple[str, ...], i: int) -> Any:
    return insert(table).values({n: bindparam(f"r{i}_{n}", type_=table.c[n].type) for n in names})


@lru_cache(maxsize=64)
def _chained_insert(shape: Shape) -> Executable:
    """``WITH r0 AS (INSERT ...), r1 AS (INSERT ...) INSERT ...``."""
    *first, last = (_insert(table, names, i) for i, (table, names) in enumerate(shape))
    return last.add_cte(*(statement.cte(f"r{i}") for i, statement in enumerate(first)))  # type: ignore[no-any-return]


def insert_new_rows(session: Session, rows: Rows) -> None:
    """Insert ``rows`` — (mapped class, column values) pairs, every column set that the database
    does not generate — in the session's transaction."""
    shape = _shape(rows)
    params = _params(shape, rows)
    if session.get_bind().dialect.name != "postgresql":
        for i, (table, names) in enumerate(shape):
            session.execute(_insert(table, names, i), params)
        return
    session.execute(_chained_insert(shape), params)


def _update(table: Table, where: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    return (
        update(table)
        .where(*(table.c[k] == bindparam(f"w_{k}", type_=table.c[k].type) for k in where))
        .values({k: bindparam(f"u_{k}", type_=table.c[k].type) for k in columns})
    )


@lru_cache(maxsize=64)
def _conditional_write(
    table: Table, where: tuple[str, ...], columns: tuple[str, ...], shape: Shape, notify: bool
) -> Executable:
    """``WITH u AS (UPDATE ... RETURNING 1), r0 AS (INSERT ... SELECT ... FROM u) SELECT 1 FROM u``."""
    matched = _update(table, where, columns).returning(literal_column("1").label("matched")).cte("u")
    inserts = []
    for i, (row_table, names) in enumerate(shape):
        # Typed: in INSERT ... SELECT the target columns do not type the parameters.
        typed = [cast(bindparam(f"r{i}_{n}", type_=row_table.c[n].type), row_table.c[n].type) for n in names]
        source = select(*typed).select_from(matched)
        statement = insert(row_table).from_select(list(names), source, include_defaults=False)
        inserts.append(statement.cte(f"r{i}"))
    answer: list[Any] = [literal_column("1")]
    if notify:
        answer.append(func.pg_notify(bindparam("n_channel"), bindparam("n_payload")))
    return select(*answer).select_from(matched).add_cte(*inserts)


def update_with_rows(
    session: Session,
    cls: type[Any],
    where: dict[str, Any],
    values: dict[str, Any],
    rows: Rows = (),
    *,
    notify: tuple[str, str] | None = None,
) -> bool:
    """Update the row of ``cls`` matching ``where`` (column equalities) and, only if it matched,
    insert ``rows`` and send ``notify`` (channel, payload) at commit; return whether it matched.
    SQLite has no NOTIFY: ``notify`` is ignored there."""
    table: Table = cls.__table__
    shape = _shape(rows)
    params = _params(shape, rows)
    params.update({f"w_{k}": v for k, v in where.items()})
    params.update({f"u_{k}": v for k, v in values.items()})
    if session.get_bind().dialect.name != "postgresql":
        result = session.execute(_update(table, tuple(where), tuple(values)), params)
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        for i, (row_table, names) in enumerate(shape):
            session.execute(_insert(row_table, names, i), params)
        return True
    if notify is not None:
        params["n_channel"], params["n_payload"] = notify
    statement = _conditional_write(table, tuple(where), tuple(values), shape, notify is not None)
    return session.execute(statement, params).first() is not None


def insert_many(session: Session, row_sets: Sequence[Rows]) -> None:
    """Insert the rows of many submits (each a ``Rows`` as for ``insert_new_rows``) with one multi-row
    INSERT per table, parents first (the order of the first set): three statements for a batch of
    jobs, where one statement per job would cost a round trip each."""
    by_table: dict[Table, list[dict[str, Any]]] = {}
    for rows in row_sets:
        for cls, row in rows:
            table = cls.__table__
            by_table.setdefault(table, []).append({k: v for k, v in row.items() if k in table.c})
    for table, values in by_table.items():
        session.execute(insert(table), values)
