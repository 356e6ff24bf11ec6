"""A tenant's API keys as an operator sees them (never the key, which is stored hashed) and their
revocation. A revoked key stops working within ``API_KEY_CACHE_SECONDS`` in every API process."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from inference_server.db import ApiKey, Tenant
from inference_server.db.base import utcnow
from inference_server.errors import Conflict, NotFound
from inference_server.jobs.serialize import iso


def list_keys(session: Session, tenant: str | None = None) -> list[dict[str, Any]]:
    """Every key (of the tenant named ``tenant``), oldest first."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    rows = session.execute(query.order_by(ApiKey.created_at, ApiKey.id)).all()
    return [key_view(key, name) for key, name in rows]


def key_view(key: ApiKey, tenant_name: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "tenant": tenant_name,
        "admin": bool(key.admin),
        "created_at": iso(key.created_at),
        "revoked_at": iso(key.revoked_at),
    }


def revoke_key(session: Session, ref: str, *, tenant: str | None = None) -> dict[str, Any]:
    """Revoke the key whose id or prefix is ``ref`` (of ``tenant``, when given) and commit. A prefix
    shared by two keys is refused (``ambiguous_key``): give the id. Revoking twice is harmless."""
    query = (
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(or_(ApiKey.id == ref, ApiKey.prefix == ref))
    )
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    rows = session.execute(query).all()
    if not rows:
        raise NotFound(f"no API key with id or prefix {ref!r}", code="key_not_found")
    if len(rows) > 1:
        raise Conflict(f"{len(rows)} keys start with {ref!r}: give the key's id", code="ambiguous_key")
    key, name = rows[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key_view(key, name)
