"""The caller's tenant (``GET /v1/tenant``: limits and usage) and, with an admin key, any tenant's
settings and API keys. The CLI's `tenants set` and `keys list|revoke` do the same through
``inference_server.tenancy``."""

from __future__ import annotations

from functools import partial
from typing import Any

from anyio import from_thread
from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from api.auth import Caller
from api.deps import AppState, current_caller, get_session, require_admin, state
from api.openapi import answers
from inference_server.db import Tenant
from inference_server.db.base import utcnow
from inference_server.tenancy import keys as tenant_keys
from inference_server.tenancy.limits import (
    TenantChanges,
    apply_changes,
    effective_rate,
    find_tenant,
    tenant_view,
)
from inference_server.tenancy.usage import usage_view

router = APIRouter(tags=["tenants"])


@router.get("/v1/tenant")
def my_tenant(
    caller: Caller = Depends(current_caller),
    session: Session = Depends(get_session),
    st: AppState = Depends(state),
) -> dict[str, Any]:
    """The caller's tenant: its limits in force and what it uses now (images this month, jobs
    running and queued, requests left in this API process's rate window)."""
    tenant = session.get(Tenant, caller.tenant.id) or caller.tenant  # fresh: the cached row may lag
    return _with_usage(session, st, tenant)


@router.get("/v1/tenants/{name}", responses=answers(None, 403))
def get_tenant(
    name: str,
    _: Caller = Depends(require_admin),
    session: Session = Depends(get_session),
    st: AppState = Depends(state),
) -> dict[str, Any]:
    return _with_usage(session, st, find_tenant(session, name))


@router.patch("/v1/tenants/{name}", responses=answers(None, 403))
def patch_tenant(
    name: str,
    body: TenantChanges,
    _: Caller = Depends(require_admin),
    session: Session = Depends(get_session),
    st: AppState = Depends(state),
) -> dict[str, Any]:
    """Change a tenant's default webhook and limits (fields left out stay as they are). API
    processes apply a change within API_KEY_CACHE_SECONDS."""
    tenant = find_tenant(session, name)
    apply_changes(tenant, body, allow_private=st.settings.allow_private_networks)
    session.commit()
    return _with_usage(session, st, tenant)


@router.get("/v1/keys", responses=answers(None, 403))
def list_keys(
    tenant: str | None = None, _: Caller = Depends(require_admin), session: Session = Depends(get_session)
) -> dict[str, Any]:
    return {"keys": tenant_keys.list_keys(session, tenant)}


@router.post("/v1/keys/{ref}/revoke", responses=answers(None, 403, 409))
def revoke_key(
    ref: str, _: Caller = Depends(require_admin), session: Session = Depends(get_session)
) -> dict[str, Any]:
    """Revoke a key by id or prefix: refused by every API process within API_KEY_CACHE_SECONDS."""
    return tenant_keys.revoke_key(session, ref)


def _with_usage(session: Session, st: AppState, tenant: Tenant) -> dict[str, Any]:
    view = tenant_view(tenant, st.settings)
    usage = usage_view(session, tenant, utcnow())
    rate = effective_rate(tenant, st.settings)
    if rate and st.limiter is not None:
        # The limiter is async (it may ask Redis); these routes run in the thread pool.
        left = from_thread.run(partial(st.limiter.remaining, tenant.id, per_minute=rate))
        usage["requests_left_this_minute"] = left
    return {**view, "usage": usage}
