"""``DELETE /v1/jobs/{id}``: a job and everything of it goes (rows, outputs and inputs in storage);
a tombstone (``deleted_jobs``) stays, so the id answers ``job_deleted`` and is never taken again.

One transaction cancels the job if it still runs (through the cancel path: its worker is told at
the commit), deletes its row (its outputs, events, outbox message and webhook deliveries go with it,
ON DELETE CASCADE, so no webhook of it is sent again) and writes the tombstone. Storage objects are
deleted first, under the job's row lock: a storage failure rolls everything back (the DELETE can be
retried), and a crash before the commit leaves rows whose objects are gone, which the next DELETE
finishes; never objects that no row lists. A worker that was uploading outputs at that moment
finds the tombstone when its success is refused, and deletes what it uploaded (workers/runner.py)."""

from __future__ import annotations

import logging

from sqlalchemy import delete
from sqlalchemy.orm import Session

from inference_server.db import DeletedJob, Job, Tenant
from inference_server.errors import NotFound
from inference_server.jobs.service import JobContext, cancel_in_transaction
from inference_server.storage.base import Storage

log = logging.getLogger(__name__)


def delete_job(session: Session, ctx: JobContext, tenant: Tenant, job_id: str) -> bool:
    """Delete the tenant's job ``job_id``; return False when it was deleted before (idempotent).
    404 ``job_not_found`` for an unknown id or another tenant's job."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.tenant_id != tenant.id:
        session.rollback()
        tomb = session.get(DeletedJob, job_id)
        if tomb is not None and tomb.tenant_id == tenant.id:
            return False
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    if job.status in ("queued", "running"):
        cancel_in_transaction(session, job)
    ctx.storage.delete(stored_objects(job, ctx.storage))
    session.execute(delete(Job).where(Job.id == job.id))
    session.add(DeletedJob(id=job.id, tenant_id=tenant.id))
    session.commit()
    log.info("job %s deleted", job_id)
    return True


def stored_objects(job: Job, storage: Storage) -> list[str]:
    """The storage objects that belong to ``job`` alone: its outputs, and its inputs stored at
    submit (an upload from ``POST /v1/uploads`` may serve other jobs: it stays)."""
    uris = [o.uri for o in job.outputs if o.uri]  # a blocked output stored nothing
    params = job.params or {}
    refs = [params.get("image"), params.get("mask"), (params.get("signature") or {}).get("image")]
    refs += [c.get("image") for c in params.get("controlnets") or []]
    refs.append((params.get("ip_adapter") or {}).get("image"))
    own = f"jobs/{job.id}/inputs/"
    uris += [r for r in refs if isinstance(r, str) and storage.owns(r) and own in r]
    return uris
