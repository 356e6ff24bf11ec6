"""Job events: written in the same transaction as the transition they record; the dispatcher
turns them into webhook deliveries.

Progress events are the bulk of the table (up to two a second per running job). One that some
webhook destination takes is stored as the full webhook body; one that no destination takes is
stored compact (``progress_event_values``): type, timestamp and a partial job (id, status,
progress), marked ``"compact": true`` and already ``fanned_out``, so the dispatcher never reads it.
Compact rather than nothing: the job's event history and live stream (``GET /v1/jobs/{id}/events``)
read this table too, and a stream resumed with ``Last-Event-ID`` should see the progress it missed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent, Tenant
from inference_server.db.base import utcnow
from inference_server.jobs.enums import TERMINAL_EVENTS, DeliveryKind, EventType, WebhookProfile
from inference_server.jobs.serialize import PREVIEW_PATH, columns, iso, job_view

JOB_FINISHED_CHANNEL = "job_finished"
JOB_CANCELED_CHANNEL = "job_canceled"  # payload: the job id; wakes the worker running it
# payload: the job id. Wakes the API processes' event streams (api/feed.py) for an event that is not
# terminal (terminal events already notify job_finished, which the streams hear too). A submit's
# job.queued sends none: NOTIFY serializes committing transactions, and the ingest path commits
# hundreds a second; streams pick those up by their periodic read (EVENTS_POLL_INTERVAL).
JOB_EVENTS_CHANNEL = "job_events"
# payload: the job id. A running job's denoising ended (workers/progress.py): the scheduler now
# counts its worker's slot as free, and the relays hearing it schedule at once (publish/slots.py).
JOB_SLOTS_CHANNEL = "job_slots"
COMPACT_PROGRESS_FIELDS = ("id", "status", "progress")


def wants(filter_: Sequence[str] | None, event_type: str) -> bool:
    """Whether an ``events`` filter admits the event: None is all; ``succeeded`` matches ``job.succeeded``."""
    if filter_ is None:
        return True
    short = event_type.removeprefix("job.")
    return any(f in (event_type, short) for f in filter_)


AMQP_PREFIX = "amqp:"  # a delivery's url for an AMQP reply: amqp:<reply_to queue>
# The events a `split` receiver has an endpoint for: progress, complete, failed (a cancel is a failure).
SPLIT_EVENTS = frozenset({EventType.PROGRESS, EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED})


class Destination(NamedTuple):
    """Where a job's events go: a URL (or ``amqp:<queue>``), its events filter, how it is sent."""

    url: str
    events: Sequence[str] | None
    kind: DeliveryKind = DeliveryKind.STANDARD

    def takes(self, event_type: str) -> bool:
        if self.kind == DeliveryKind.SPLIT and event_type not in SPLIT_EVENTS:
            return False
        return wants(self.events, event_type)


def destinations(job: Any, tenant: Any) -> list[Destination]:
    """A job's destinations: its own webhook, or the tenant's default when it names none, shaped by
    the job's profile or else the tenant's; and its AMQP reply queue, if it was submitted with one."""
    found = []
    default_profile = getattr(tenant, "default_webhook_profile", None) if tenant is not None else None
    if job.webhook_url:
        profile = job.webhook_profile or default_profile
        found.append(Destination(job.webhook_url, job.webhook_events, _kind(profile)))
    elif tenant is not None and tenant.default_webhook_url:
        found.append(
            Destination(tenant.default_webhook_url, tenant.default_webhook_events, _kind(default_profile))
        )
    if job.reply_to:
        found.append(Destination(AMQP_PREFIX + job.reply_to, job.reply_events, DeliveryKind.AMQP))
    return found


def _kind(profile: str | None) -> DeliveryKind:
    return DeliveryKind.SPLIT if profile == WebhookProfile.SPLIT else DeliveryKind.STANDARD


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


def notify_slot_freed(session: Session, job_id: str) -> None:
    """Tell the relays (at commit) that ``job_id`` no longer holds its worker's slot. PostgreSQL
    only: elsewhere the relay finds it at its next pass."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(JOB_SLOTS_CHANNEL, job_id)))


def finished_notice(job: dict[str, Any]) -> str:
    """The ``job_finished`` NOTIFY payload for a finished job (as the API shows it). The job rides
    along so a long-polling request answers without reading it back, unless it is too big for
    NOTIFY (8000 bytes): then only its id."""
    message = json.dumps({"id": job["id"], "job": job}, default=str)
    return message if len(message) < 7900 else job["id"]


def wants_full_progress(session: Session, job: Any) -> bool:
    """Whether a webhook destination of ``job`` takes ``job.progress`` (the tenant's default webhook
    is read only when the job names none: a primary-key lookup)."""
    tenant = None
    if not job.webhook_url:
        columns = (Tenant.default_webhook_url, Tenant.default_webhook_events, Tenant.default_webhook_profile)
        tenant = session.execute(select(*columns).where(Tenant.id == job.tenant_id)).first()
    return any(d.takes(EventType.PROGRESS) for d in destinations(job, tenant))


def emit_preview(session: Session, job: Job, step: int) -> JobEvent:
    """Add a ``job.preview`` event for ``job`` (flushed state): the job, and in ``data.preview``
    the preview's URL (relative, like output URLs) and the step it shows; the caller commits."""
    session.flush()
    values = event_values(columns(job), EventType.PREVIEW, [columns(o) for o in job.outputs])
    values["payload"]["data"]["preview"] = {"url": PREVIEW_PATH.format(job_id=job.id), "step": step}
    event = JobEvent(**values)
    session.add(event)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(JOB_EVENTS_CHANNEL, job.id)))
    return event


def progress_event_values(session: Session, job: Job) -> dict[str, Any]:
    """The event row for a progress tick of ``job``: the full webhook body when a destination takes
    progress, otherwise the compact record described in the module docstring."""
    values = event_values(columns(job), EventType.PROGRESS, [columns(o) for o in job.outputs])
    if not wants_full_progress(session, job):
        data = values["payload"]["data"]
        values["payload"] = {
            "type": values["type"],
            "timestamp": values["payload"]["timestamp"],
            "compact": True,
            "data": {k: data[k] for k in COMPACT_PROGRESS_FIELDS},
        }
        values["fanned_out"] = True  # nothing to deliver
    return values


def emit_progress(session: Session, job: Job) -> JobEvent:
    """Add a ``job.progress`` event for ``job`` (flushed state), full or compact; the caller commits."""
    session.flush()
    event = JobEvent(**progress_event_values(session, job))
    session.add(event)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(JOB_EVENTS_CHANNEL, job.id)))
    return event
