"""`inference-server tenants set`: a tenant's settings, one option each (scheduling limits, the
webhook profile and the bearer token its `split` callbacks carry); ``keys create`` takes the
scheduling limits too."""

from __future__ import annotations

import json
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.db import Tenant
from inference_server.errors import ConfigurationError
from inference_server.jobs.enums import Priority, WebhookProfile

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


def set_webhook_profile(
    tenant: Tenant, *, profile: str | None, token: str | None, clear_token: bool = False
) -> None:
    """Set the tenant's default webhook profile and/or its webhook token; the caller commits."""
    if profile is not None:
        tenant.default_webhook_profile = WebhookProfile(profile).value
    if token is not None:
        tenant.webhook_token = token or None
    if clear_token:
        tenant.webhook_token = None


def find_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise ConfigurationError(f"no tenant named {name!r}", code="unknown_tenant")
    return tenant


@click.group()
def tenants() -> None:
    """Tenants' settings."""


@tenants.command("set")
@click.option("--tenant", required=True, help="The tenant's name (as given to `keys create`).")
@max_priority_option
@max_concurrent_option
@click.option(
    "--webhook-profile",
    type=click.Choice([p.value for p in WebhookProfile]),
    default=None,
    help="Default shape of the tenant's webhooks (a job's webhook.profile overrides it).",
)
@click.option("--webhook-token", default=None, help="Static bearer token sent by `split` callbacks.")
@click.option("--clear-webhook-token", is_flag=True, help="Send `split` callbacks without a token.")
def tenants_set(
    tenant: str,
    max_priority: str | None,
    max_concurrent: int | None,
    webhook_profile: str | None,
    webhook_token: str | None,
    clear_webhook_token: bool,
) -> None:
    """Change a tenant's settings; prints them as JSON (never the token itself). API processes see
    a change within their key cache's lifetime (30 s)."""
    from inference_server.cli.main import _settings
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory

    settings = _settings()
    engine = make_database(settings.database_url, timeouts=DatabaseTimeouts.from_settings(settings))
    try:
        with make_session_factory(engine)() as session:
            row = find_tenant(session, tenant)
            apply_limits(row, max_priority=max_priority, max_concurrent=max_concurrent)
            set_webhook_profile(
                row, profile=webhook_profile, token=webhook_token, clear_token=clear_webhook_token
            )
            session.commit()
            shown = {
                "tenant": row.name,
                **limits_view(row),
                "webhook_profile": row.default_webhook_profile or WebhookProfile.STANDARD.value,
                "webhook_token": "set" if row.webhook_token else None,
            }
        click.echo(json.dumps(shown))
    finally:
        engine.dispose()
