"""Storing attempt results: the delivery's next state, its attempt row, 410 bookkeeping, promotion
of the next delivery in each finished chain. One transaction per batch of results."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, Text, case, cast, column, insert, update, values
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.db.base import UTCDateTime, utcnow
from webhooks import metrics
from webhooks.chain import promote
from webhooks.delivery import AttemptResult, plan_next
from webhooks.fanout import url_hash
from webhooks.tables import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookGoneURL


@dataclass(frozen=True)
class Claimed:
    """A delivery a dispatcher holds the lease on, with everything needed to send it."""

    id: str
    token: str
    url: str
    event_id: str
    attempts: int
    retry_base: int
    tenant_id: str
    job_id: str
    body: bytes
    secrets: list[str]


def record_results(session: Session, done: list[tuple[Claimed, AttemptResult]], delays: list[float],
                   now: datetime | None = None) -> None:
    """Apply finished attempts. A row is only updated under its claim token, so a result that comes
    back after its lease was taken over by another dispatcher changes nothing. The caller commits."""
    if not done:
        return
    now = now or utcnow()
    rows: list[tuple[Any, ...]] = []
    attempts: list[dict[str, Any]] = []
    gone: set[tuple[str, str]] = set()
    finished_jobs: set[str] = set()
    for c, r in done:
        n = c.attempts + 1
        nxt = plan_next(r, n - c.retry_base, delays, now)
        rows.append((c.id, c.token, nxt.status, n, nxt.next_attempt_at, r.status_code, r.error,
                     now if nxt.status == DeliveryStatus.SUCCEEDED else None))
        attempts.append({"delivery_id": c.id, "number": n, "started_at": r.started_at,
                         "duration_ms": int(r.duration * 1000), "status_code": r.status_code, "error": r.error})
        if nxt.status == DeliveryStatus.GONE:
            gone.add((c.tenant_id, c.url))
        if nxt.status not in DeliveryStatus.ACTIVE:
            finished_jobs.add(c.job_id)
        metrics.DELIVERIES.labels(outcome=nxt.outcome).inc()
        metrics.ATTEMPT_SECONDS.observe(r.duration)

    # One UPDATE ... FROM (VALUES ...) for the whole batch rather than a statement per row.
    v = values(
        column("id", String), column("token", String), column("status", String), column("attempts", Integer),
        column("next_at", UTCDateTime()), column("code", Integer), column("error", Text),
        column("delivered", UTCDateTime()), name="results",
    ).data(rows)
    t = WebhookDelivery.__table__
    delivered = cast(v.c.delivered, UTCDateTime())
    session.execute(
        update(t)
        .where(t.c.id == v.c.id, t.c.claim_token == v.c.token)
        .values(
            status=v.c.status, attempts=cast(v.c.attempts, Integer),
            next_attempt_at=cast(v.c.next_at, UTCDateTime()), last_status_code=cast(v.c.code, Integer),
            last_error=cast(v.c.error, Text), claim_token=None, updated_at=now,
            delivered_at=case((delivered.is_(None), t.c.delivered_at), else_=delivered),
        )
    )
    session.execute(insert(WebhookAttempt.__table__), attempts)
    for tenant_id, url in gone:
        mark_gone(session, tenant_id, url)
    promote(session, finished_jobs)


def mark_gone(session: Session, tenant_id: str, url: str) -> None:
    """Remember a 410 and stop the URL's unsent deliveries (rows being sent finish on their own)."""
    try:
        with session.begin_nested():
            session.execute(insert(WebhookGoneURL).values(tenant_id=tenant_id, url=url, url_sha256=url_hash(url)))
    except IntegrityError:
        pass  # already known
    d = WebhookDelivery
    count = session.execute(
        update(d)
        .where(d.tenant_id == tenant_id, d.url == url,
               d.status.in_((DeliveryStatus.PENDING, DeliveryStatus.WAITING)))
        .values(status=DeliveryStatus.GONE, next_attempt_at=None, updated_at=utcnow(),
                last_error="not sent: this URL answered 410 Gone"),
        execution_options={"synchronize_session": False},
    ).rowcount
    if count:
        metrics.DELIVERIES.labels(outcome=DeliveryStatus.GONE).inc(count)
