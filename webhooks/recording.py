"""Storing attempt results: the delivery's next state, its attempt row, 410 bookkeeping, and the
move of each chain's cursor (``chain.advance``). One transaction per batch of results."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.db.base import UTCDateTime, utcnow
from inference_server.logs import job_context
from webhooks import metrics
from webhooks.chain import Ended, advance, affected
from webhooks.delivery import AttemptResult, NextState, plan_next
from webhooks.fanout import url_hash
from webhooks.tables import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookGoneURL

log = logging.getLogger(__name__)


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
    event_seq: int
    body: bytes
    secrets: list[str]
    kind: str = "standard"  # DeliveryKind
    event_type: str | None = None
    payload: dict[str, Any] | None = None  # the event body as a dict (split and AMQP deliveries)
    bearer: str | None = None  # the tenant's static token (split deliveries)
    correlation_id: str | None = None  # the job's (AMQP replies)
    request_key: str | None = None  # the job's idempotency key (the split profile's generation_id)


def record_results(
    session: Session,
    done: list[tuple[Claimed, AttemptResult]],
    delays: list[float],
    now: datetime | None = None,
) -> None:
    """Apply finished attempts. A row is only updated under its claim token, so a result that comes
    back after its lease was taken over by another dispatcher changes nothing. The caller commits."""
    if not done:
        return
    now = now or utcnow()
    rows: list[tuple[Any, ...]] = []
    attempts: list[dict[str, Any]] = []
    gone: set[tuple[str, str]] = set()
    ended: dict[str, Ended] = {}
    for c, r in done:
        n = c.attempts + 1
        nxt = plan_next(r, n - c.retry_base, delays, now)
        rows.append(
            (
                c.id,
                c.token,
                nxt.status,
                n,
                nxt.next_attempt_at,
                r.status_code,
                r.error,
                now if nxt.status == DeliveryStatus.SUCCEEDED else None,
            )
        )
        attempts.append(
            {
                "delivery_id": c.id,
                "number": n,
                "started_at": r.started_at,
                "duration_ms": int(r.duration * 1000),
                "status_code": r.status_code,
                "error": r.error,
            }
        )
        if nxt.status == DeliveryStatus.GONE:
            gone.add((c.tenant_id, c.url))
        failed = nxt.status in DeliveryStatus.ACTIVE
        # No answer at all (refused, timed out) or a Retry-After: the job's other events would fare
        # no better now, so the chain pauses instead of walking on (chain.py).
        pause = failed and (r.status_code is None or r.retry_after is not None)
        ended[c.id] = Ended(c.job_id, c.url, c.event_seq, failed, pause)
        metrics.DELIVERIES.labels(outcome=nxt.outcome).inc()
        metrics.ATTEMPT_SECONDS.observe(r.duration)
        if nxt.outcome != "succeeded":
            _log_failure(c, r, n, nxt)

    if session.get_bind().dialect.name == "postgresql":
        applied = _apply_postgresql(session, rows, attempts, now)
    else:
        applied = _apply_portable(session, rows, attempts, now)
    for tenant_id, url in gone:
        mark_gone(session, tenant_id, url)
    # Only results recorded under their claim move a chain: a zombie's late answer changes nothing.
    advance(session, [e for delivery_id, e in ended.items() if delivery_id in applied], now)


def _log_failure(c: Claimed, r: AttemptResult, number: int, nxt: NextState) -> None:
    """One line per failed attempt: INFO while it will be retried, WARNING when it never will."""
    answer = f"HTTP {r.status_code}" if r.status_code is not None else (r.error or "no answer")
    fields = {"event_id": c.event_id, "url": c.url, "delivery_attempt": number, "outcome": nxt.outcome}
    with job_context(job_id=c.job_id, tenant=c.tenant_id):
        if nxt.outcome == "retry":
            log.info(
                "webhook delivery failed (%s), attempt %d; retried at %s",
                answer,
                number,
                nxt.next_attempt_at.isoformat() if nxt.next_attempt_at else "?",
                extra=fields,
            )
        elif nxt.outcome == "gone":
            log.warning("webhook URL answered 410 Gone: its deliveries stop", extra=fields)
        else:
            log.warning("webhook delivery given up after %d attempts (%s)", number, answer, extra=fields)


# PostgreSQL: the whole batch in two statements whose text never changes (arrays, not a VALUES list
# that SQLAlchemy would compile afresh for every batch).
_PG_UPDATE = text("""
    UPDATE webhook_deliveries AS d
    SET status = r.status, attempts = r.attempts, next_attempt_at = r.next_at, last_status_code = r.code,
        last_error = r.error, claim_token = NULL, updated_at = :now,
        delivered_at = COALESCE(r.delivered, d.delivered_at)
    FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[]), CAST(:statuses AS text[]),
                CAST(:attempts AS int[]), CAST(:next_ats AS timestamptz[]), CAST(:codes AS int[]),
                CAST(:errors AS text[]), CAST(:delivered AS timestamptz[]))
         AS r(id, token, status, attempts, next_at, code, error, delivered)
    WHERE d.id = r.id AND d.claim_token = r.token
    RETURNING d.id
""")
_PG_ATTEMPTS = text("""
    INSERT INTO webhook_attempts (delivery_id, number, started_at, duration_ms, status_code, error)
    SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:numbers AS int[]), CAST(:started AS timestamptz[]),
                         CAST(:durations AS int[]), CAST(:codes AS int[]), CAST(:errors AS text[]))
""")


def _apply_postgresql(
    session: Session, rows: list[tuple[Any, ...]], attempts: list[dict[str, Any]], now: datetime
) -> set[str]:
    """Apply the batch; return the ids of the deliveries whose claim still held."""
    cols = list(zip(*rows, strict=True))
    applied = session.execute(
        _PG_UPDATE,
        {
            "now": now,
            "ids": list(cols[0]),
            "tokens": list(cols[1]),
            "statuses": list(cols[2]),
            "attempts": list(cols[3]),
            "next_ats": list(cols[4]),
            "codes": list(cols[5]),
            "errors": list(cols[6]),
            "delivered": list(cols[7]),
        },
    ).scalars()
    applied_ids = set(applied)
    session.execute(
        _PG_ATTEMPTS,
        {
            "ids": [a["delivery_id"] for a in attempts],
            "numbers": [a["number"] for a in attempts],
            "started": [a["started_at"] for a in attempts],
            "durations": [a["duration_ms"] for a in attempts],
            "codes": [a["status_code"] for a in attempts],
            "errors": [a["error"] for a in attempts],
        },
    )
    return applied_ids


def _apply_portable(
    session: Session, rows: list[tuple[Any, ...]], attempts: list[dict[str, Any]], now: datetime
) -> set[str]:
    t = cast(Table, WebhookDelivery.__table__)
    stmt = (
        update(t)
        .where(t.c.id == bindparam("b_id"), t.c.claim_token == bindparam("b_token"))
        .values(
            status=bindparam("b_status"),
            attempts=bindparam("b_attempts"),
            next_attempt_at=bindparam("b_next"),
            last_status_code=bindparam("b_code"),
            last_error=bindparam("b_error"),
            claim_token=None,
            updated_at=now,
            delivered_at=func.coalesce(bindparam("b_delivered", type_=UTCDateTime()), t.c.delivered_at),
        )
    )
    keys = ("b_id", "b_token", "b_status", "b_attempts", "b_next", "b_code", "b_error", "b_delivered")
    applied = set()
    # One statement per row (the embedded SQLite mode is one process): each rowcount says whether
    # the claim held.
    for row in rows:
        if affected(session.connection().execute(stmt, dict(zip(keys, row, strict=True)))):
            applied.add(row[0])
    session.execute(insert(cast(Table, WebhookAttempt.__table__)), attempts)
    return applied


def mark_gone(session: Session, tenant_id: str, url: str) -> None:
    """Remember a 410 and stop the URL's unsent deliveries (rows being sent finish on their own)."""
    try:
        with session.begin_nested():
            session.execute(
                insert(WebhookGoneURL).values(tenant_id=tenant_id, url=url, url_sha256=url_hash(url))
            )
    except IntegrityError:
        pass  # already known
    d = WebhookDelivery
    count = affected(
        session.execute(
            update(d)
            .where(
                d.tenant_id == tenant_id,
                d.url == url,
                d.status.in_((DeliveryStatus.PENDING, DeliveryStatus.WAITING)),
            )
            .values(
                status=DeliveryStatus.GONE,
                next_attempt_at=None,
                updated_at=utcnow(),
                last_error="not sent: this URL answered 410 Gone",
            ),
            execution_options={"synchronize_session": False},
        )
    )
    if count:
        metrics.DELIVERIES.labels(outcome=DeliveryStatus.GONE).inc(count)
        with job_context(tenant=tenant_id):
            log.warning("%d unsent webhook deliveries to %s stopped: it answered 410 Gone", count, url)
