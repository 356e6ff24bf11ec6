"""`inference-server tenants set|show`: a tenant's default webhook and its limits, as the admin API's
``PATCH /v1/tenants/{name}`` changes them (both through ``inference_server.tenancy.limits``)."""

from __future__ import annotations

import json
from typing import Any

import click

from inference_server.cli.keys_cmd import database_session
from inference_server.jobs.enums import EventType


@click.group()
def tenants() -> None:
    """Tenants' settings and limits."""


@tenants.command("set")
@click.option("--tenant", required=True, help="The tenant's name (as given to `keys create`).")
@click.option(
    "--default-webhook", default=None, help="Webhook URL for the tenant's jobs that name none ('' clears)."
)
@click.option(
    "--events",
    default=None,
    help="Comma-separated events the default webhook gets (job.succeeded,job.failed,...; '' for all).",
)
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
    "--inherit",
    multiple=True,
    type=click.Choice(["rate-limit", "monthly-images", "output-retention-days"]),
    help="Go back to the API's setting for this limit (repeatable).",
)
def tenants_set(
    tenant: str,
    default_webhook: str | None,
    events: str | None,
    rate_limit: int | None,
    monthly_images: int | None,
    output_retention_days: float | None,
    inherit: tuple[str, ...],
) -> None:
    """Change a tenant's settings; prints them as JSON. API processes apply a change within
    API_KEY_CACHE_SECONDS."""
    from inference_server.cli.main import _settings
    from inference_server.tenancy.limits import TenantChanges, apply_changes, find_tenant, tenant_view

    given: dict[str, Any] = {}
    if default_webhook is not None:
        given["default_webhook_url"] = default_webhook or None
    if events is not None:
        names = [e.strip() for e in events.split(",") if e.strip()]
        known = {e.value for e in EventType}
        unknown = sorted(set(names) - known)
        if unknown:
            raise click.BadParameter(f"unknown event {unknown[0]!r} (events: {', '.join(sorted(known))})")
        given["default_webhook_events"] = names or None
    for field, value in (
        ("rate_limit_per_minute", rate_limit),
        ("monthly_image_quota", monthly_images),
        ("output_retention_days", output_retention_days),
    ):
        if value is not None:
            given[field] = value
    for name in inherit:
        given[
            {"rate-limit": "rate_limit_per_minute", "monthly-images": "monthly_image_quota"}.get(
                name, "output_retention_days"
            )
        ] = None
    settings = _settings()
    with database_session() as session:
        row = find_tenant(session, tenant)
        apply_changes(row, TenantChanges(**given), allow_private=settings.allow_private_networks)
        session.commit()
        click.echo(json.dumps(tenant_view(row, settings)))


@tenants.command("show")
@click.option("--tenant", required=True)
def tenants_show(tenant: str) -> None:
    """Print a tenant's settings, limits and usage this month as JSON."""
    from inference_server.cli.main import _settings
    from inference_server.db.base import utcnow
    from inference_server.tenancy.limits import find_tenant, tenant_view
    from inference_server.tenancy.usage import usage_view

    settings = _settings()
    with database_session() as session:
        row = find_tenant(session, tenant)
        click.echo(json.dumps({**tenant_view(row, settings), "usage": usage_view(session, row, utcnow())}))
