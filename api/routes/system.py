"""Probes and metrics (the model catalog is in routes/models.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.deps import AppState, get_session, state
from api.errors import error_response
from api.openapi import answers
from inference_server.errors import NotFound
from inference_server.schemas import Health, Readiness

router = APIRouter()
METRICS_ANSWER: dict[int | str, Any] = {
    200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/healthz", tags=["system"], response_model=None, responses=answers(Health))
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["system"], responses=answers(Readiness, 503))
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


@router.get("/metrics", tags=["system"], responses=METRICS_ANSWER)
def metrics(st: AppState = Depends(state)) -> Response:
    """Prometheus metrics; with ``API_METRICS_PORT`` set, served on that port only."""
    if st.settings.api_metrics_port:
        raise NotFound("metrics are served on the metrics port (API_METRICS_PORT)", code="not_found")
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
