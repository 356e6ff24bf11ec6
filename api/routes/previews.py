"""``GET /v1/jobs/{id}/preview``: the latest preview of a job that asked for previews."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import AppState, current_tenant, get_session, state
from api.openapi import answers
from api.routes.jobs import BINARY
from inference_server.db import JobEvent, Tenant
from inference_server.errors import NotFound
from inference_server.jobs import service
from inference_server.jobs.enums import EventType
from inference_server.storage.base import preview_key, uri_of

router = APIRouter(tags=["jobs"])


@router.get(
    "/v1/jobs/{job_id}/preview",
    response_model=None,
    responses={
        **answers(None, 404),
        200: {"content": {"image/png": {"schema": BINARY}}, "description": "The latest preview (PNG)."},
    },
)
def get_preview(
    job_id: str,
    session: Session = Depends(get_session),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> Response:
    """The job's latest preview, a small PNG at latent resolution; 404 ``preview_not_found`` until
    the first one (or for a job that did not ask for previews). ``X-Preview-Step`` is its step."""
    job = service.get_job(session, tenant, job_id)
    latest = session.execute(
        select(JobEvent.payload)
        .where(JobEvent.job_id == job.id, JobEvent.type == EventType.PREVIEW.value)
        .order_by(JobEvent.seq.desc())
        .limit(1)
    ).scalar()
    if latest is None:
        raise NotFound(f"job {job_id} has no preview yet", code="preview_not_found")
    data = st.ctx.storage.get(uri_of(st.ctx.storage, preview_key(job.id)))
    step = str(latest["data"].get("preview", {}).get("step", ""))
    headers = {"Cache-Control": "no-store", "X-Preview-Step": step}
    return Response(data, media_type="image/png", headers=headers)
