"""A tenant's settings that an operator changes (`tenants set`, ``PATCH /v1/tenants/{name}``): its
default webhook and its limits. API processes see a change within the key cache's lifetime
(``API_KEY_CACHE_SECONDS``): the tenant rides along with its cached key."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.db import Tenant
from inference_server.errors import InvalidRequest, NotFound
from inference_server.jobs.enums import EventType, Priority
from inference_server.settings import Settings


class TenantChanges(BaseModel):
    """What may change; a field left out stays as it is, ``null`` returns it to the API's setting
    (for ``default_webhook_url``: no default webhook)."""

    model_config = ConfigDict(extra="forbid")

    default_webhook_url: str | None = Field(default=None, max_length=2048)
    default_webhook_events: list[EventType] | None = None  # None: every event
    rate_limit_per_minute: int | None = Field(default=None, ge=0)  # 0: no limit
    monthly_image_quota: int | None = Field(default=None, ge=0)  # 0: no limit
    output_retention_days: float | None = Field(default=None, ge=0)  # 0: kept forever
    # Composition: the safety of jobs that name none (null: SAFETY_DEFAULT), words prompts may not hold.
    safety: Literal["off", "flag", "block"] | None = None
    deny_words: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        default=None, max_length=500
    )


def find_tenant(session: Session, name: str) -> Tenant:
    """The tenant named ``name``, or ``NotFound`` (``tenant_not_found``)."""
    row = session.scalar(select(Tenant).where(Tenant.name == name))
    if row is None:
        raise NotFound(f"no tenant named {name!r}", code="tenant_not_found")
    return row


def apply_changes(tenant: Tenant, changes: TenantChanges, *, allow_private: bool) -> None:
    """Set the fields ``changes`` names on ``tenant`` (the caller commits)."""
    given = changes.model_fields_set
    if "default_webhook_url" in given and changes.default_webhook_url:
        from inference_server import netguard

        url = changes.default_webhook_url
        if not url.startswith(("https://", "http://")):
            raise InvalidRequest("the default webhook must be an https:// URL", code="invalid_request")
        netguard.check_url(url, allow_private=allow_private)
    for name in given:
        value = getattr(changes, name)
        if name == "default_webhook_events" and value is not None:
            value = [e.value for e in value]
        if name == "deny_words":
            value = value or None
        setattr(tenant, name, value or None if name == "default_webhook_url" else value)


def tenant_view(tenant: Tenant, settings: Settings) -> dict[str, Any]:
    """The tenant's settings, each with the value in force (its own, else the API's)."""
    return {
        "name": tenant.name,
        "default_webhook": {"url": tenant.default_webhook_url, "events": tenant.default_webhook_events}
        if tenant.default_webhook_url
        else None,
        "limits": {
            "rate_limit_per_minute": effective_rate(tenant, settings) or None,
            "monthly_image_quota": tenant.monthly_image_quota or None,
            # The scheduler's limits: the highest priority allowed, and jobs at once (beyond it
            # they wait in the queue, they are not refused).
            "max_priority": tenant.max_priority or Priority.NORMAL.value,
            "max_concurrent": tenant.max_concurrent,
            "output_retention_days": effective_retention(tenant, settings) or None,
        },
        # Composition jobs (docs/composition.md): the safety in force and the prompt deny-list.
        "safety": tenant.safety or settings.safety_default,
        "deny_words": tenant.deny_words or [],
    }


def effective_rate(tenant: Tenant, settings: Settings) -> int:
    """Requests per minute the tenant may send (0: no limit)."""
    own = tenant.rate_limit_per_minute
    return settings.rate_limit_per_minute if own is None else own


def effective_retention(tenant: Tenant, settings: Settings) -> float:
    """Days the tenant's outputs are kept after their job finished (0: forever)."""
    own = tenant.output_retention_days
    return settings.output_retention_days if own is None else own
