"""Probes, metrics and the model catalog."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.deps import AppState, current_tenant, get_session, state
from api.errors import error_response
from inference_server.db import Tenant

router = APIRouter()


@router.get("/healthz", tags=["system"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["system"])
def readyz(session: Session = Depends(get_session), st: AppState = Depends(state)) -> Response:
    checks = {"database": True, "broker": True}
    try:
        session.execute(text("SELECT 1"))
    except Exception:
        checks["database"] = False
    if st.broker is not None:
        checks["broker"] = st.broker.reachable()
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    down = ", ".join(k for k, ok in checks.items() if not ok)
    return error_response("dependency_unavailable", f"not ready: {down} unreachable", checks=checks)


@router.get("/metrics", tags=["system"])
def metrics(st: AppState = Depends(state)) -> Response:
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["models"])
def models(
    _: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """The registry's families with, per family, the consumers of its queue (``online_workers``)
    and the workers' own heartbeats (``workers``: slots, busy, device, GPU memory in bytes, None on
    a CPU). ``gpu_memory_free`` is the most any one of them has free."""
    from inference_server.publish.scheduler import online_workers

    catalog = st.ctx.registry.catalog()
    queues = {f["name"]: st.ctx.registry.families[f["name"]].queue for f in catalog["families"]}
    online = st.broker.consumers(list(queues.values())) if st.broker is not None else {}
    fleet = online_workers(session, timeout=st.settings.worker_heartbeat_timeout)
    for family in catalog["families"]:
        family["online_workers"] = online.get(queues[family["name"]])
        workers = fleet.get(family["name"], [])
        family["workers"] = workers
        free = [w["gpu_memory_free"] for w in workers if w["gpu_memory_free"] is not None]
        family["gpu_memory_free"] = max(free) if free else None
    return catalog
