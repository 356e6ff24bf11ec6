"""`inference-server tenants set|show`: a tenant's default webhook (URL, events, profile, the token
of `split` callbacks), its scheduling limits (highest priority, jobs at once; ``keys create`` takes
them too) and its other limits, as the admin API's ``PATCH /v1/tenants/{name}`` changes them (the
limits through ``inference_server.tenancy.limits``, the profile through ``set_webhook_profile``)."""

from __future__ import annotations

import json
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.cli.keys_cmd import database_session
from inference_server.db import Tenant
from inference_server.errors import NotFound
from inference_server.jobs.enums import EventType, Priority, WebhookProfile

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

INHERITED = {
    "rate-limit": "rate_limit_per_minute",
    "monthly-images": "monthly_image_quota",
    "output-retention-days": "output_retention_days",
}


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


def apply_limits(tenant: Any, *, max_priority: str | None, max_concurrent: int | None) -> None:
    """Set the scheduling limits given on the Tenant row ``tenant`` (the caller commits)."""
    if max_priority is not None:
        tenant.max_priority = max_priority
    if max_concurrent is not None:
        tenant.max_concurrent = max_concurrent or None


@click.group()
def tenants() -> None:
    """Tenants' settings and limits."""


@tenants.command("set")
@click.option("--tenant", required=True, help="The tenant's name (as given to `keys create`).")
@max_priority_option
@max_concurrent_option
@click.option(
    "--default-webhook", default=None, help="Webhook URL for the tenant's jobs that name none ('' clears)."
)
@click.option(
    "--events",
    default=None,
    help="Comma-separated events the default webhook gets (job.succeeded,job.failed,...; '' for all).",
)
@click.option(
    "--webhook-profile",
    type=click.Choice([p.value for p in WebhookProfile]),
    default=None,
    help="Default shape of the tenant's webhooks (a job's webhook.profile overrides it).",
)
@click.option("--webhook-token", default=None, help="Static bearer token sent by `split` callbacks.")
@click.option("--clear-webhook-token", is_flag=True, help="Send `split` callbacks without a token.")
@click.option("--rate-limit", type=click.IntRange(min=0), default=None, help="Requests per minute (0: none).")
@click.option(
    "--monthly-images", type=click.IntRange(min=0), default=None, help="Images a month (0: no quota)."
)
@click.option(
    "--output-retention-days",
    type=click.FloatRange(min=0),
    default=None,
    help="Days outputs are kept (0: forever); overrides OUTPUT_RETENTION_DAYS.",
)
@click.option(
    "--safety",
    type=click.Choice(["off", "flag", "block", "inherit"]),
    default=None,
    help="Safety of the tenant's jobs that name none (inherit: SAFETY_DEFAULT).",
)
@click.option(
    "--deny-words",
    default=None,
    help="Comma-separated words or phrases a prompt may not hold ('' clears).",
)
@click.option(
    "--inherit",
    multiple=True,
    type=click.Choice(sorted(INHERITED)),
    help="Go back to the API's setting for this limit (repeatable).",
)
def tenants_set(
    tenant: str,
    max_priority: str | None,
    max_concurrent: int | None,
    default_webhook: str | None,
    events: str | None,
    webhook_profile: str | None,
    webhook_token: str | None,
    clear_webhook_token: bool,
    rate_limit: int | None,
    monthly_images: int | None,
    output_retention_days: float | None,
    safety: str | None,
    deny_words: str | None,
    inherit: tuple[str, ...],
) -> None:
    """Change a tenant's settings; prints what it has now as JSON (never the token itself). API
    processes apply a change within API_KEY_CACHE_SECONDS."""
    from inference_server.cli.main import _settings
    from inference_server.tenancy.limits import TenantChanges, apply_changes, find_tenant

    given: dict[str, Any] = {INHERITED[name]: None for name in inherit}
    if default_webhook is not None:
        given["default_webhook_url"] = default_webhook or None
    if events is not None:
        given["default_webhook_events"] = _events(events)
    for field, value in (
        ("rate_limit_per_minute", rate_limit),
        ("monthly_image_quota", monthly_images),
        ("output_retention_days", output_retention_days),
    ):
        if value is not None:
            given[field] = value
    if safety is not None:
        given["safety"] = None if safety == "inherit" else safety
    if deny_words is not None:
        given["deny_words"] = [w.strip() for w in deny_words.split(",") if w.strip()] or None
    settings = _settings()
    with database_session() as session:
        row = find_tenant(session, tenant)
        apply_changes(row, TenantChanges(**given), allow_private=settings.allow_private_networks)
        apply_limits(row, max_priority=max_priority, max_concurrent=max_concurrent)
        set_webhook_profile(
            session, tenant, profile=webhook_profile, token=webhook_token, clear_token=clear_webhook_token
        )
        session.commit()
        click.echo(json.dumps(_shown(row, settings)))


@tenants.command("show")
@click.option("--tenant", required=True)
def tenants_show(tenant: str) -> None:
    """Print a tenant's settings, limits and usage this month as JSON."""
    from inference_server.cli.main import _settings
    from inference_server.db.base import utcnow
    from inference_server.tenancy.limits import find_tenant
    from inference_server.tenancy.usage import usage_view

    settings = _settings()
    with database_session() as session:
        row = find_tenant(session, tenant)
        click.echo(json.dumps({**_shown(row, settings), "usage": usage_view(session, row, utcnow())}))


def _events(text: str) -> list[str] | None:
    names = [e.strip() for e in text.split(",") if e.strip()]
    known = {e.value for e in EventType}
    unknown = sorted(set(names) - known)
    if unknown:
        raise click.BadParameter(f"unknown event {unknown[0]!r} (events: {', '.join(sorted(known))})")
    return names or None


def _shown(row: Tenant, settings: Any) -> dict[str, Any]:
    from inference_server.tenancy.limits import tenant_view

    view = tenant_view(row, settings)
    return {
        "tenant": view.pop("name"),
        "webhook_profile": row.default_webhook_profile or WebhookProfile.STANDARD.value,
        "webhook_token": "set" if row.webhook_token else None,
        **view,
    }
