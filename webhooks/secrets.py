"""Per-tenant webhook secrets and their rotation with a grace period."""

from __future__ import annotations

import base64
import secrets as _random
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.db import Tenant
from inference_server.db.base import utcnow
from inference_server.errors import NotFound
from webhooks.signing import SECRET_PREFIX

SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh random secret written ``whsec_<base64>`` (32 bytes of key)."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(SECRET_BYTES)).decode("ascii")


def rotate_webhook_secret(session: Session, tenant_name: str, grace_hours: float) -> str:
    """Give the tenant a new secret and return it; the old one keeps signing for ``grace_hours``.

    During the grace period every delivery carries both signatures, so a receiver can switch to the
    new secret whenever it likes. Commits (the secret is printed to the operator: it must be stored
    before it is shown). Raises ``NotFound`` for an unknown tenant."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name).with_for_update()).first()
    if tenant is None:
        raise NotFound(f"no tenant named {tenant_name!r}")
    secret = new_secret()
    tenant.previous_webhook_secret = tenant.webhook_secret
    tenant.previous_secret_expires_at = utcnow() + timedelta(hours=grace_hours)
    tenant.webhook_secret = secret
    session.commit()
    return secret


class HasSecrets(Protocol):
    """A ``Tenant`` or any row with its three secret columns."""

    @property
    def webhook_secret(self) -> str: ...
    @property
    def previous_webhook_secret(self) -> str | None: ...
    @property
    def previous_secret_expires_at(self) -> datetime | None: ...


def signing_secrets(tenant: HasSecrets, now: datetime) -> list[str]:
    """The secrets a delivery is signed with now: the current one, then the previous one in its grace."""
    result = [tenant.webhook_secret]
    expires = tenant.previous_secret_expires_at
    if tenant.previous_webhook_secret and expires is not None and expires > now:
        result.append(tenant.previous_webhook_secret)
    return result
