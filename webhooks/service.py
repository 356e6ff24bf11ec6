"""What the API asks of webhooks, and the only module of this package it imports: a job's
deliveries, replaying one (tenant-scoped: another tenant's job or delivery is ``NotFound``), a new
tenant's signing secret, and the delivery backlog for the API's metrics."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from inference_server.db import Job
from inference_server.db.base import utcnow
from inference_server.errors import Conflict, NotFound
from inference_server.jobs.serialize import iso
from webhooks import metrics
from webhooks.fanout import url_hash
from webhooks.metrics import DeliveryBacklogCollector
from webhooks.secrets import new_secret
from webhooks.tables import DeliveryStatus, WebhookDelivery, WebhookGoneURL

__all__ = ["DeliveryBacklogCollector", "delivery_to_dict", "list_deliveries", "new_secret", "replay_delivery"]


def list_deliveries(session: Session, tenant_id: str, job_id: str) -> list[WebhookDelivery]:
    """A job's deliveries in event order, attempts loaded."""
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant_id)) is None:
        raise NotFound(f"no job {job_id}")
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id, WebhookDelivery.tenant_id == tenant_id)
            .options(selectinload(WebhookDelivery.attempt_log))
            .order_by(WebhookDelivery.event_seq, WebhookDelivery.created_at)
        )
    )


def replay_delivery(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    """Send a delivery again, whatever its state, with the same event id and a fresh retry schedule.

    A replay also lifts a 410 block on the URL: the operator says the receiver is back. Raises
    ``Conflict`` while an attempt is in flight. Commits."""
    delivery = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.tenant_id == tenant_id)
        .with_for_update()
    ).first()
    if delivery is None:
        raise NotFound(f"no webhook delivery {delivery_id}")
    if delivery.status == DeliveryStatus.SENDING:
        raise Conflict(
            "this delivery is being sent right now; replay it once the attempt is over",
            code="delivery_in_flight",
        )
    now = utcnow()
    delivery.status = DeliveryStatus.PENDING
    delivery.next_attempt_at = now
    delivery.retry_base = delivery.attempts
    delivery.claim_token = None
    delivery.updated_at = now
    session.execute(
        delete(WebhookGoneURL).where(
            WebhookGoneURL.tenant_id == tenant_id, WebhookGoneURL.url_sha256 == url_hash(delivery.url)
        )
    )
    session.commit()
    metrics.DELIVERIES.labels(outcome="replayed").inc()
    session.refresh(delivery, ["attempt_log"])
    return delivery


def delivery_to_dict(d: WebhookDelivery) -> dict[str, Any]:
    """A delivery as the API shows it."""
    return {
        "id": d.id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "url": d.url,
        "kind": d.kind,  # standard, split (the split profile) or amqp (a reply to url amqp:<queue>)
        "status": d.status,
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "next_attempt_at": iso(d.next_attempt_at) if d.status in DeliveryStatus.ACTIVE else None,
        "created_at": iso(d.created_at),
        "delivered_at": iso(d.delivered_at),
        "attempt_log": [
            {
                "number": a.number,
                "started_at": iso(a.started_at),
                "duration_ms": a.duration_ms,
                "status_code": a.status_code,
                "error": a.error,
            }
            for a in d.attempt_log
        ],
    }
