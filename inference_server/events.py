"""Job events: written in the same transaction as the transition they record; the dispatcher
turns them into webhook deliveries."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent
from inference_server.db.base import utcnow
from inference_server.jobs.serialize import iso, job_to_dict
from inference_server.jobs.status import TERMINAL_EVENT, EventType

JOB_FINISHED_CHANNEL = "job_finished"
JOB_CANCELED_CHANNEL = "job_canceled"  # payload: the job id; wakes the worker running it
TERMINAL_TYPES = frozenset(str(e) for e in TERMINAL_EVENT.values())


def event_values(job: Any, event_type: EventType | str, *, api_base: str = "") -> dict[str, Any]:
    """The columns of the event row for ``job`` as it is now (a Job, or any object with its fields)."""
    now = utcnow()
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "job_id": job.id,
        "tenant_id": job.tenant_id,
        "type": str(event_type),
        "payload": {
            "type": str(event_type),
            "timestamp": iso(now),
            "data": job_to_dict(job, api_base=api_base),
        },
        "fanned_out": False,
        "created_at": now,
    }


def emit(session: Session, job: Job, event_type: EventType | str, *, api_base: str = "") -> JobEvent:
    """Add an event for ``job`` (flushed state) to ``session``; the caller commits.

    A terminal event also notifies ``job_finished`` listeners on PostgreSQL (delivered at commit),
    which wakes API requests long-polling for the job."""
    session.flush()
    event = JobEvent(**event_values(job, event_type, api_base=api_base))
    session.add(event)
    if event.type in TERMINAL_TYPES and session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(JOB_FINISHED_CHANNEL, finished_notice(event.payload["data"]))))
        if event.type == EventType.CANCELED:
            session.execute(select(func.pg_notify(JOB_CANCELED_CHANNEL, job.id)))
    return event


def finished_notice(job: dict[str, Any]) -> str:
    """The ``job_finished`` NOTIFY payload for a finished job (as the API shows it). The job rides
    along so a long-polling request answers without reading it back, unless it is too big for
    NOTIFY (8000 bytes): then only its id."""
    message = json.dumps({"id": job["id"], "job": job}, default=str)
    return message if len(message) < 7900 else job["id"]
