"""Job events: written in the same transaction as the transition they record; the dispatcher
turns them into webhook deliveries."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent
from inference_server.db.base import utcnow
from inference_server.jobs.serialize import iso, job_to_dict
from inference_server.jobs.status import EventType


def emit(session: Session, job: Job, event_type: EventType | str, *, api_base: str = "") -> JobEvent:
    """Add an event for ``job`` (flushed state) to ``session``; the caller commits."""
    session.flush()
    now = utcnow()
    event = JobEvent(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=job.id,
        tenant_id=job.tenant_id,
        type=str(event_type),
        payload={"type": str(event_type), "timestamp": iso(now), "data": job_to_dict(job, api_base=api_base)},
        created_at=now,
    )
    session.add(event)
    return event
