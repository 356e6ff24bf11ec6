"""Job endpoints: submit, read, list, cancel, outputs. Routes parse, call ``jobs.service``, shape."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, current_tenant, get_session, state
from api.openapi import answers
from api.waiter import Waiting
from inference_server.db import Tenant
from inference_server.db.base import new_id
from inference_server.errors import Gone, InvalidRequest, NotFound
from inference_server.jobs import deletion, service
from inference_server.jobs.enums import TERMINAL
from inference_server.jobs.serialize import job_to_dict, with_api_base
from inference_server.jobs.spec import JobRequest
from inference_server.schemas import JobList, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


BINARY = {"type": "string", "format": "binary"}
OUTPUT_ANSWERS: dict[int | str, Any] = {
    200: {
        "description": "The output's bytes (with file storage).",
        "content": {f"image/{f}": {"schema": BINARY} for f in ("png", "jpeg", "webp")},
    },
    307: {"description": "A redirect to a presigned URL of the output (with S3 or GCS storage)."},
    410: {"description": "The output was deleted by retention (`output_expired`)."},
}
DELETE_ANSWERS: dict[int | str, Any] = {204: {"description": "Deleted (now, or before)."}}

PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d+)", re.IGNORECASE)
MAX_WAIT = 60.0


@router.post("", status_code=202, response_model=None, responses=answers(JobView, 409, status=202))
async def submit_job(
    body: JobRequest,
    idempotency_key: str | None = Header(default=None, min_length=1, max_length=255),
    prefer: str | None = Header(default=None, max_length=200),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> Response:
    """Submit a job. With ``Prefer: wait=N`` (RFC 7240, up to 60 s) the answer is held until the job
    ends or N seconds pass: one request instead of a submit and a long-poll."""
    # The hot path: one hop to the thread pool for the whole database transaction, and the job's
    # JSON written directly (it is already plain data; response-model validation would walk it again).
    match = PREFER_WAIT.search(prefer) if prefer else None
    wait = min(float(match.group(1)), MAX_WAIT) if match else 0.0
    job_id = new_id()
    # Registered before the commit, so the job's end cannot slip in between.
    waiting = st.waiter.register(job_id) if wait else None
    try:
        result, job = await run_in_threadpool(_submit, st, tenant, body, idempotency_key, job_id)
        if wait and job["status"] not in TERMINAL:
            job = await _until_finished(st, tenant, job["id"], wait, job, waiting if result.created else None)
    finally:
        if waiting is not None:
            st.waiter.unregister(job_id, waiting)
    headers = {"Location": f"/v1/jobs/{job['id']}"}
    if wait:
        headers["Preference-Applied"] = f"wait={int(wait)}"  # as applied: at most MAX_WAIT
    if result.created:
        st.metrics.submitted.labels(body.family).inc()
    else:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job, status_code=202, headers=headers)


def _submit(
    st: AppState, tenant: Tenant, body: JobRequest, key: str | None, job_id: str
) -> tuple[service.Submitted, dict[str, Any]]:
    with st.session_factory() as session:
        result = service.submit(session, st.ctx, tenant, body, idempotency_key=key, job_id=job_id)
        return result, with_api_base(result.view, st.settings.api_url)


LIST_FILTERS = frozenset({"status", "family", "limit", "cursor"})


@router.get("", response_model=None, responses=answers(JobList))
def list_jobs(
    request: Request,
    status: str | None = None,
    family: str | None = None,
    limit: int = Query(default=50, ge=1, le=200),
    cursor: str | None = None,
    session: Session = Depends(get_session),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> dict[str, Any]:
    unknown = sorted(set(request.query_params) - LIST_FILTERS)
    if unknown:
        # A filter that is silently ignored answers a different question than the one asked.
        raise InvalidRequest(
            f"unknown filter {unknown[0]!r} (filters: {', '.join(sorted(LIST_FILTERS))})",
            code="invalid_filter",
        )
    jobs, next_cursor = service.list_jobs(
        session, tenant, status=status, family=family, limit=limit, cursor=cursor
    )
    return {"jobs": [job_to_dict(j, api_base=st.settings.api_url) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=None, responses=answers(JobView))
async def get_job(
    job_id: str,
    wait: float = Query(default=0.0, ge=0.0, le=60.0, description="Seconds to wait for the job to finish"),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> Response:
    """The job; with ``wait``, held open until the job finishes or ``wait`` seconds pass."""
    if wait <= 0:
        return JSONResponse(await run_in_threadpool(_read, st, tenant, job_id))
    return JSONResponse(await _until_finished(st, tenant, job_id, wait))


async def _until_finished(
    st: AppState,
    tenant: Tenant,
    job_id: str,
    wait: float,
    job: dict[str, Any] | None = None,
    waiting: Waiting | None = None,
) -> dict[str, Any]:
    """The job once it is finished, or as it is when ``wait`` seconds have passed. ``job`` is its
    state as already read, ``waiting`` a registration made before that read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        finished = waiting or st.waiter.register(job_id)
        waiting = None
        try:
            if job is None:
                job = await run_in_threadpool(_read, st, tenant, job_id)
            remaining = deadline - loop.time()
            if job["status"] in TERMINAL or remaining <= 0:
                return job
            announced = await st.waiter.wait(finished, remaining)
            if announced is not None:
                return with_api_base(announced, st.settings.api_url)  # the tenant's own job: read above
            job = None
        finally:
            st.waiter.unregister(job_id, finished)


def _read(st: AppState, tenant: Tenant, job_id: str) -> dict[str, Any]:
    with st.session_factory() as session:
        return job_to_dict(service.get_job(session, tenant, job_id), api_base=st.settings.api_url)


@router.post("/{job_id}/cancel", response_model=None, responses=answers(JobView, 409))
def cancel_job(
    job_id: str,
    session: Session = Depends(get_session),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> dict[str, Any]:
    return job_to_dict(service.cancel(session, st.ctx, tenant, job_id), api_base=st.settings.api_url)


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=DELETE_ANSWERS)
def delete_job(
    job_id: str,
    session: Session = Depends(get_session),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> Response:
    """Delete the job: canceled first if it still runs, then its outputs and inputs in storage and
    its rows; its id answers 404 ``job_deleted`` from then on. Deleting it again answers 204."""
    deletion.delete_job(session, st.ctx, tenant, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/outputs/{index}", response_model=None, responses=OUTPUT_ANSWERS)
def get_output(
    job_id: str,
    index: int,
    session: Session = Depends(get_session),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> Response:
    job = service.get_job(session, tenant, job_id)
    output = next((o for o in job.outputs if o.index == index), None)
    if output is None and job.outputs_expired_at is not None:
        raise Gone(f"the outputs of job {job_id} were deleted by retention", code="output_expired")
    if output is None:
        raise NotFound(f"job {job_id} has no output {index}", code="output_not_found")
    if output.blocked or output.uri is None:
        raise NotFound(
            f"output {index} of job {job_id} was blocked by the safety checker: nothing was kept",
            code="content_blocked",
        )
    url = st.ctx.storage.presigned_url(output.uri, st.settings.presign_expires_seconds)
    if url:
        return RedirectResponse(url, status_code=307)
    return Response(
        st.ctx.storage.get(output.uri),
        media_type=output.content_type,
        headers={"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{output.sha256}"'},
    )
