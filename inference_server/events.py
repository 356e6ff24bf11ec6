"""Job events: written in the same transaction as the transition they record; the dispatcher
turns them into webhook deliveries."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent
from inference_server.db.base import utcnow
from inference_server.jobs.enums import TERMINAL_EVENTS, EventType
from inference_server.jobs.serialize import columns, iso, job_view

JOB_FINISHED_CHANNEL = "job_finished"
JOB_CANCELED_CHANNEL = "job_canceled"  # payload: the job id; wakes the worker running it


def event_values(
    job: Mapping[str, Any], event_type: EventType, outputs: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The columns of the event row for ``job`` (its ``jobs`` columns) and ``outputs`` as they are now."""
    now = utcnow()
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "job_id": job["id"],
        "tenant_id": job["tenant_id"],
        "type": event_type.value,
        "payload": {
            "type": event_type.value,
            "timestamp": iso(now),
            "data": job_view(job, outputs),
        },
        "fanned_out": False,
        "created_at": now,
    }


def emit(session: Session, job: Job, event_type: EventType) -> JobEvent:
    """Add an event for ``job`` (flushed state) to ``session``; the caller commits.

    A terminal event also notifies ``job_finished`` listeners on PostgreSQL (delivered at commit),
    which wakes API requests long-polling for the job."""
    session.flush()
    event = JobEvent(**event_values(columns(job), event_type, [columns(o) for o in job.outputs]))
    session.add(event)
    if event_type in TERMINAL_EVENTS and session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(JOB_FINISHED_CHANNEL, finished_notice(event.payload["data"]))))
        if event_type == EventType.CANCELED:
            session.execute(select(func.pg_notify(JOB_CANCELED_CHANNEL, job.id)))
    return event


def finished_notice(job: dict[str, Any]) -> str:
    """The ``job_finished`` NOTIFY payload for a finished job (as the API shows it). The job rides
    along so a long-polling request answers without reading it back, unless it is too big for
    NOTIFY (8000 bytes): then only its id."""
    message = json.dumps({"id": job["id"], "job": job}, default=str)
    return message if len(message) < 7900 else job["id"]
