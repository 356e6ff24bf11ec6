"""`inference-server keys list|revoke`: a tenant's API keys as an operator sees them (prefix, when
made, revoked, admin; never the key) and their revocation, by id or prefix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.orm import Session


@contextmanager
def database_session() -> Iterator[Session]:
    """A session on DATABASE_URL for one command, its engine disposed afterwards."""
    from inference_server.cli.main import _settings
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory

    settings = _settings()
    engine = make_database(settings.database_url, timeouts=DatabaseTimeouts.from_settings(settings))
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


@click.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
def keys_list(tenant: str | None) -> None:
    """Print the keys as JSON lines: id, prefix, tenant, admin, created_at, revoked_at."""
    from inference_server.tenancy.keys import list_keys

    with database_session() as session:
        for key in list_keys(session, tenant):
            click.echo(json.dumps(key))


@click.command("revoke")
@click.argument("ref")
@click.option("--tenant", default=None, help="Only among this tenant's keys.")
def keys_revoke(ref: str, tenant: str | None) -> None:
    """Revoke the key whose id or prefix (as `keys list` shows it) is REF. API processes refuse it
    within API_KEY_CACHE_SECONDS (30 s by default)."""
    from inference_server.tenancy.keys import revoke_key

    with database_session() as session:
        click.echo(json.dumps(revoke_key(session, ref, tenant=tenant)))
