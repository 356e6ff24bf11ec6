"""`inference-server tenants ...`: a tenant's settings, one option each (other commands add theirs
to the ``tenants`` group); and the scheduling limits that ``keys create`` may set too."""

from __future__ import annotations

import json
from typing import Any

import click

from inference_server.jobs.enums import Priority

PRIORITIES = click.Choice([p.value for p in Priority])

max_priority_option = click.option(
    "--max-priority", type=PRIORITIES, default=None, help="Highest priority the tenant's jobs may ask for."
)
max_concurrent_option = click.option(
    "--max-concurrent",
    type=click.IntRange(min=0),
    default=None,
    help="Jobs of the tenant running at once, in all families (0: no limit).",
)


def apply_limits(tenant: Any, *, max_priority: str | None, max_concurrent: int | None) -> None:
    """Set the options given on the Tenant row ``tenant`` (the caller commits)."""
    if max_priority is not None:
        tenant.max_priority = max_priority
    if max_concurrent is not None:
        tenant.max_concurrent = max_concurrent or None


def limits_view(tenant: Any) -> dict[str, Any]:
    return {
        "max_priority": tenant.max_priority or Priority.NORMAL.value,
        "max_concurrent": tenant.max_concurrent,
    }


@click.group()
def tenants() -> None:
    """Tenants' settings."""


@tenants.command("set")
@click.option("--tenant", required=True)
@max_priority_option
@max_concurrent_option
def tenants_set(tenant: str, max_priority: str | None, max_concurrent: int | None) -> None:
    """Change a tenant's settings; prints them as JSON. API processes see a change within 30 s."""
    from sqlalchemy import select

    from inference_server.cli.main import _settings
    from inference_server.db import DatabaseTimeouts, Tenant, make_database, make_session_factory
    from inference_server.errors import ConfigurationError

    settings = _settings()
    engine = make_database(settings.database_url, timeouts=DatabaseTimeouts.from_settings(settings))
    try:
        with make_session_factory(engine)() as session:
            row = session.scalar(select(Tenant).where(Tenant.name == tenant))
            if row is None:
                raise ConfigurationError(f"no tenant named {tenant!r}", code="unknown_tenant")
            apply_limits(row, max_priority=max_priority, max_concurrent=max_concurrent)
            session.commit()
            click.echo(json.dumps({"tenant": row.name, **limits_view(row)}))
    finally:
        engine.dispose()
