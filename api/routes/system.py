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
    if st.registry_watch is not None:  # MODELS_FILE not there yet (api/registry_watch.py)
        checks["registry"] = st.registry_watch.ready()
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    down = ", ".join(k for k, ok in checks.items() if not ok)
    return error_response("dependency_unavailable", f"not ready: {down} unreachable", checks=checks)


@router.get("/metrics", tags=["system"])
def metrics(st: AppState = Depends(state)) -> Response:
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["models"])
def models(_: Tenant = Depends(current_tenant), st: AppState = Depends(state)) -> dict[str, Any]:
    catalog = st.ctx.registry.catalog()
    queues = {f["name"]: st.ctx.registry.families[f["name"]].queue for f in catalog["families"]}
    online = st.broker.consumers(list(queues.values())) if st.broker is not None else {}
    for family in catalog["families"]:
        family["online_workers"] = online.get(queues[family["name"]])
    return catalog
