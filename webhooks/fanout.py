"""Events to deliveries: pick the destination, apply the event filter, coalesce progress.

Each committed ``JobEvent`` with ``fanned_out = False`` becomes at most one delivery per destination
(the job's webhook, or else the tenant's default). Terminal events always get their row. A progress
event supersedes the same job's progress deliveries that are still waiting, so a dead receiver
accumulates one pending progress row per job, not thousands.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent, Tenant
from inference_server.db.base import new_id, utcnow
from inference_server.events import destinations
from inference_server.jobs.enums import EventType
from webhooks import metrics
from webhooks.chain import affected, release_times, repair
from webhooks.tables import DeliveryStatus, WebhookDelivery, WebhookGoneURL

PROGRESS = EventType.PROGRESS.value
# One fan-out at a time across dispatchers (PostgreSQL advisory lock): two fan-outs splitting one
# job's events could otherwise create its deliveries out of order. Fan-out is a few milliseconds.
FANOUT_LOCK_KEY = 0x57484F4B


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def fan_out(session: Session, *, batch_size: int = 500, skip_locked: bool = True) -> int:
    """Turn up to ``batch_size`` unprocessed events into delivery rows; return how many events were taken.

    On PostgreSQL (``skip_locked``) one dispatcher fans out at a time (an advisory transaction lock;
    the others skip this step) and events are locked ``FOR UPDATE SKIP LOCKED``. The caller commits:
    the deliveries and the ``fanned_out`` marks land together."""
    if (
        skip_locked
        and not session.execute(text(f"SELECT pg_try_advisory_xact_lock({FANOUT_LOCK_KEY})")).scalar()
    ):
        return 0
    stmt = (
        select(JobEvent.seq, JobEvent.id, JobEvent.job_id, JobEvent.tenant_id, JobEvent.type)
        .where(JobEvent.fanned_out.is_(False))
        .order_by(JobEvent.seq)
        .limit(batch_size)
    )
    if skip_locked:
        stmt = stmt.with_for_update(skip_locked=True)
    events = session.execute(stmt).all()
    if not events:
        return 0
    job_ids = {e.job_id for e in events}
    tenant_ids = {e.tenant_id for e in events}
    jobs = {
        row.id: row
        for row in session.execute(
            select(
                Job.id,
                Job.webhook_url,
                Job.webhook_events,
                Job.webhook_profile,
                Job.reply_to,
                Job.reply_events,
            ).where(Job.id.in_(job_ids))
        )
    }
    tenants = {
        row.id: row
        for row in session.execute(
            select(
                Tenant.id,
                Tenant.default_webhook_url,
                Tenant.default_webhook_events,
                Tenant.default_webhook_profile,
            ).where(Tenant.id.in_(tenant_ids))
        )
    }
    gone = {
        (row.tenant_id, row.url_sha256)
        for row in session.execute(
            select(WebhookGoneURL.tenant_id, WebhookGoneURL.url_sha256).where(
                WebhookGoneURL.tenant_id.in_(tenant_ids)
            )
        )
    }

    # Only the newest progress event of this batch per (job, url) gets a row.
    planned: list[tuple[Any, str, str]] = []
    latest_progress: dict[tuple[str, str], int] = {}
    for event in events:
        job = jobs.get(event.job_id)
        if job is None:
            continue
        for destination in destinations(job, tenants.get(event.tenant_id)):
            if not destination.takes(event.type):
                continue
            url = destination.url
            planned.append((event, url, destination.kind))
            if event.type == PROGRESS:
                latest_progress[(event.job_id, url)] = event.seq

    now = utcnow()
    inherited = _supersede_waiting_progress(session, latest_progress)
    # Chains with unfinished deliveries, and when a new event joining each is due (chain.py).
    busy = release_times(session, {event.job_id for event, _, _ in planned})
    rows: list[dict[str, Any]] = []
    coalesced = 0
    for event, url, kind in planned:
        if event.type == PROGRESS and latest_progress[(event.job_id, url)] != event.seq:
            coalesced += 1
            continue
        row = {
            "id": new_id(),
            "event_seq": event.seq,
            "event_id": event.id,
            "event_type": event.type,
            "job_id": event.job_id,
            "tenant_id": event.tenant_id,
            "url": url,
            "kind": kind,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "retry_base": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        chain = (event.job_id, url)
        if (event.tenant_id, url_hash(url)) in gone:
            row.update(
                status=DeliveryStatus.GONE,
                next_attempt_at=None,
                last_error="not sent: this URL answered 410 Gone earlier",
            )
            metrics.DELIVERIES.labels(outcome=DeliveryStatus.GONE).inc()
        elif chain in busy:
            row.update(status=DeliveryStatus.WAITING, next_attempt_at=busy[chain])
        else:
            busy[chain] = None  # a fresh chain: what follows waits for this one's first answer
            if event.type == PROGRESS:
                # Keep the replaced row's backoff so a dead receiver is not hit at every progress tick.
                row["next_attempt_at"] = max(now, inherited.get(chain, now))
        rows.append(row)
    if rows:
        # render_nulls: a waiting row's NULL next_attempt_at (not yet released) must not become the
        # column's default, now.
        session.execute(insert(WebhookDelivery).execution_options(render_nulls=True), rows)
    if inherited:  # a superseded progress delivery may have been its chain's cursor
        repair(session, {job_id for job_id, _ in inherited})
    session.execute(
        update(JobEvent).where(JobEvent.seq.in_([e.seq for e in events])).values(fanned_out=True),
        execution_options={"synchronize_session": False},
    )
    if coalesced:
        metrics.DELIVERIES.labels(outcome=DeliveryStatus.SUPERSEDED).inc(coalesced)
    return len(events)


def _supersede_waiting_progress(
    session: Session, latest: dict[tuple[str, str], int]
) -> dict[tuple[str, str], datetime]:
    """Delete unsent progress deliveries older than the new ones; return their next attempt times.

    Rows being sent (``sending``) are left alone: they finish, and the new row waits behind them."""
    inherited: dict[tuple[str, str], datetime] = {}
    if not latest:
        return inherited
    d = WebhookDelivery
    unsent = (DeliveryStatus.PENDING, DeliveryStatus.WAITING)
    # Two statements per batch whatever the number of jobs: hundreds of GPUs report progress at once.
    candidates = session.execute(
        select(d.id, d.job_id, d.url, d.event_seq, d.next_attempt_at).where(
            d.job_id.in_({job_id for job_id, _ in latest}), d.event_type == PROGRESS, d.status.in_(unsent)
        )
    ).all()
    stale = [c for c in candidates if c.event_seq < latest.get((c.job_id, c.url), -1)]
    if not stale:
        return inherited
    # Deleted, not kept as history: a job reporting progress twice a second to a dead receiver would
    # otherwise leave thousands of rows. Re-checked under the row lock: a row a dispatcher claimed
    # meanwhile is no longer unsent and stays.
    replaced = affected(
        session.execute(
            delete(d).where(d.id.in_([c.id for c in stale]), d.status.in_(unsent)),
            execution_options={"synchronize_session": False},
        )
    )
    metrics.DELIVERIES.labels(outcome=DeliveryStatus.SUPERSEDED).inc(replaced)
    for c in stale:
        key = (c.job_id, c.url)
        when = c.next_attempt_at or utcnow()
        inherited[key] = max(inherited.get(key, when), when)
    return inherited
