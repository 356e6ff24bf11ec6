"""`inference-server tenants set`: a tenant's webhook profile and the bearer token its `split`
callbacks carry. (Other `tenants set` options live with their own features; the options here are
applied by ``set_webhook_profile``.)"""

from __future__ import annotations

import json

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.db import Tenant
from inference_server.errors import NotFound
from inference_server.jobs.enums import WebhookProfile


def set_webhook_profile(
    session: Session, name: str, *, profile: str | None, token: str | None, clear_token: bool = False
) -> Tenant:
    """Set the tenant's default webhook profile and/or its webhook token; the caller commits."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"no tenant named {name!r}", code="not_found")
    if profile is not None:
        tenant.default_webhook_profile = WebhookProfile(profile).value
    if token is not None:
        tenant.webhook_token = token or None
    if clear_token:
        tenant.webhook_token = None
    return tenant


@click.group()
def tenants() -> None:
    """Tenant settings."""


@tenants.command("set")
@click.option("--tenant", required=True, help="The tenant's name (as given to `keys create`).")
@click.option(
    "--webhook-profile",
    type=click.Choice([p.value for p in WebhookProfile]),
    default=None,
    help="Default shape of the tenant's webhooks (a job's webhook.profile overrides it).",
)
@click.option("--webhook-token", default=None, help="Static bearer token sent by `split` callbacks.")
@click.option("--clear-webhook-token", is_flag=True, help="Send `split` callbacks without a token.")
def tenants_set(
    tenant: str, webhook_profile: str | None, webhook_token: str | None, clear_webhook_token: bool
) -> None:
    """Change a tenant's settings; prints what it has now (never the token itself)."""
    from inference_server.cli.main import _settings
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory

    settings = _settings()
    engine = make_database(settings.database_url, timeouts=DatabaseTimeouts.from_settings(settings))
    try:
        with make_session_factory(engine)() as session:
            row = set_webhook_profile(
                session, tenant, profile=webhook_profile, token=webhook_token, clear_token=clear_webhook_token
            )
            session.commit()
            shown = {
                "tenant": row.name,
                "webhook_profile": row.default_webhook_profile or WebhookProfile.STANDARD.value,
                "webhook_token": "set" if row.webhook_token else None,
            }
        click.echo(json.dumps(shown))
    finally:
        engine.dispose()
