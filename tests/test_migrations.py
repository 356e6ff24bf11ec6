"""The whole migration chain, every revision present: upgrade to head, down to nothing, up again,
on a fresh PostgreSQL database and on SQLite. At head the schema matches the models (so a column
added to a model without its migration, or an ALTER SQLite cannot run, fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

import webhooks.tables  # noqa: F401  (their tables on the same metadata)
from inference_server.db import Base
from inference_server.devtools import services
from inference_server.migrate import alembic_config
from tests.conftest import PG_ADMIN


def _schema_differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    # Types are compared loosely across dialects (JSON variants, UTC datetimes): tables, columns and
    # indexes are what a missing migration leaves out.
    return [d for d in diff if not (isinstance(d, list) or d[0] in ("modify_type", "modify_nullable"))]


def _round_trip(url: str) -> None:
    config = alembic_config(url)
    revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]
    assert len(revisions) >= 6 and "0010" in revisions
    command.upgrade(config, "head")
    assert _schema_differences(url) == []
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"jobs", "tenants", "deleted_jobs", "tenant_usage", "runtime_models"} <= tables
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        command.upgrade(config, "head")
        assert set(inspect(engine).get_table_names()) == tables
    finally:
        engine.dispose()
    assert _schema_differences(url) == []


def test_the_chain_on_sqlite(tmp_path: Path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'chain.sqlite'}")


def test_the_chain_on_postgresql() -> None:
    try:
        # A new database (made at head: the downgrade walks every revision from there).
        with services.fresh_database("is_chain", PG_ADMIN) as url:
            _round_trip(url)
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
