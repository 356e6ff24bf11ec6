"""Migration 0007 (the runtime registry) upgrades and downgrades on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect

from inference_server.migrate import upgrade

TABLES = {
    "runtime_models",
    "runtime_loras",
    "registry_version",
    "placement_requests",
    "placement_answers",
    "worker_models",
}


def _round_trip(url: str) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    from inference_server.migrate import alembic_config

    config = alembic_config(url)
    # Below 0007 whatever the coordinator chains it after.
    below = ScriptDirectory.from_config(config).get_revision("0007").down_revision
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        assert "admin" in {c["name"] for c in inspect(engine).get_columns("api_keys")}
        command.downgrade(config, str(below))
        inspect_down = inspect(engine)
        assert not TABLES & set(inspect_down.get_table_names())
        assert "admin" not in {c["name"] for c in inspect_down.get_columns("api_keys")}
        upgrade(url)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    _round_trip(url)


def test_on_postgresql(scratch_db_url: str) -> None:
    _round_trip(scratch_db_url)
