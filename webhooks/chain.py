"""Per-job ordering: the deliveries of one job to one URL form a chain in event order.

Only a chain's first unfinished delivery is claimable (``pending``/``sending``); later ones are
``waiting``. When the head ends (delivered, exhausted, gone, superseded) the next one is promoted.
A promotion can be missed when an event is fanned out while its chain's head is being recorded in
another transaction; ``promote`` run as a periodic sweep repairs that within seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, select, update
from sqlalchemy.orm import Session, aliased

from inference_server.db.base import utcnow
from webhooks.tables import DeliveryStatus, WebhookDelivery


def affected(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched."""
    return cast("CursorResult[Any]", result).rowcount or 0


def open_chains(session: Session, job_ids: Iterable[str]) -> set[tuple[str, str]]:
    """(job_id, url) pairs that have an unfinished delivery."""
    d = WebhookDelivery
    ids = list(job_ids)
    if not ids:
        return set()
    rows = session.execute(
        select(d.job_id, d.url).where(d.job_id.in_(ids), d.status.in_(DeliveryStatus.OPEN)).distinct()
    )
    return {(row.job_id, row.url) for row in rows}


def promote(
    session: Session, job_ids: Iterable[str] | None = None, *, older_than: datetime | None = None
) -> int:
    """Make due every waiting delivery with nothing unfinished before it in its chain; return how many.

    ``job_ids`` limits it to those jobs (after recording results); ``older_than`` limits the sweep to
    rows that have waited a while, so it does not race a fan-out that is still committing."""
    d = WebhookDelivery
    earlier = aliased(WebhookDelivery)
    blocked = (
        select(earlier.id)
        .where(
            earlier.job_id == d.job_id,
            earlier.url == d.url,
            earlier.event_seq < d.event_seq,
            earlier.status.in_(DeliveryStatus.OPEN),
        )
        .exists()
    )
    conditions = [d.status == DeliveryStatus.WAITING, ~blocked]
    if job_ids is not None:
        ids = list(job_ids)
        if not ids:
            return 0
        conditions.append(d.job_id.in_(ids))
    if older_than is not None:
        conditions.append(d.updated_at < older_than)
    now = utcnow()
    result = session.execute(
        update(d)
        .where(*conditions)
        .values(status=DeliveryStatus.PENDING, next_attempt_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    return affected(result)


def sweep(session: Session, min_age: float = 2.0) -> int:
    """Promote waiting deliveries whose promotion was missed (see the module docstring)."""
    return promote(session, older_than=utcnow() - timedelta(seconds=min_age))
