"""Per-job ordering: the deliveries of one job to one URL form a chain, sent one at a time in event
order, and a failure holds the rest of the chain for at most one retry interval.

Only one delivery of a chain is claimable at a time (``pending``/``sending``: the cursor); the others
are ``waiting``. A chain moves in rounds:

- A delivery that succeeds (or ends: exhausted, gone) hands the cursor to the next one at once, so
  a receiver that answers gets every event in order, back to back.
- The first failure of a fresh chain pauses it: the failed delivery stays the cursor, due at its
  retry time, and every later delivery is *released* for that time (``next_attempt_at`` set on a
  waiting row). A receiver that blinked once still gets the events in order.
- In a round, a failure does not stop the walk past released deliveries: each is tried once, in
  order, right after the one before it, whatever that one's answer. So an event that keeps failing
  (a receiver that rejects one payload) never holds the others past one interval.
- At the end of a round the cursor goes back to the chain's first unfinished delivery, due at its
  own retry time, and everything behind it is released for that time: when a receiver comes back,
  all of the job's pending events go out at the next attempt, in order.

A failure without an answer (connection refused, timeout) or with ``Retry-After`` pauses the chain
whatever the round: the receiver is away, or asked us to wait, and trying the job's other events
would only wait out more timeouts. Each delivery keeps its own attempt count and retry schedule, so
none is given up earlier than its own schedule says.

A cursor can be lost when an event is fanned out while its chain's last delivery is being recorded
in another transaction; ``sweep`` repairs that within seconds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, Table, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from inference_server.db.base import utcnow
from webhooks.tables import DeliveryStatus, WebhookDelivery

Chain = tuple[str, str]  # (job_id, url)


def affected(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched."""
    return cast("CursorResult[Any]", result).rowcount or 0


@dataclass(frozen=True)
class Ended:
    """An attempt whose result was recorded: the chain it belongs to and how it went."""

    job_id: str
    url: str
    event_seq: int
    failed: bool  # the delivery is still open (due again later)
    pause: bool = False  # no answer, or Retry-After: do not walk on


def release_times(session: Session, job_ids: Iterable[str]) -> dict[Chain, datetime | None]:
    """For each chain of these jobs with unfinished deliveries: when a new event joining it is due.

    None while nothing in the chain has failed (the new event simply waits its turn); otherwise the
    cursor's next attempt time (or now, when the cursor is being sent), so that the next round walks
    on to it even if the deliveries before it fail again."""
    d = WebhookDelivery
    ids = list(job_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(d.job_id, d.url, d.status, d.attempts, d.next_attempt_at).where(
            d.job_id.in_(ids), d.status.in_(DeliveryStatus.OPEN)
        )
    ).all()
    failed: set[Chain] = set()
    cursor: dict[Chain, Any] = {}
    for row in rows:
        key = (row.job_id, row.url)
        if row.attempts > 0:
            failed.add(key)
        if row.status in DeliveryStatus.ACTIVE:
            cursor[key] = row
    now = utcnow()
    out: dict[Chain, datetime | None] = {}
    for row in rows:
        key = (row.job_id, row.url)
        if key not in failed:
            out[key] = None
            continue
        c = cursor.get(key)
        if c is not None and c.status == DeliveryStatus.PENDING and c.next_attempt_at is not None:
            out[key] = c.next_attempt_at
        else:
            out[key] = now
    return out


def advance(session: Session, ended: list[Ended], now: datetime | None = None) -> int:
    """Move each chain's cursor after its recorded attempts (see the module docstring); return how
    many rows changed. Runs in the recording transaction, after the results were applied."""
    if not ended:
        return 0
    now = now or utcnow()
    d = WebhookDelivery
    chains = {(e.job_id, e.url): e for e in ended}
    rows = session.execute(
        select(d.id, d.job_id, d.url, d.event_seq, d.status, d.next_attempt_at)
        .where(d.job_id.in_({e.job_id for e in ended}), d.status.in_(DeliveryStatus.OPEN))
        .order_by(d.event_seq)
    ).all()
    open_rows: dict[Chain, list[Any]] = defaultdict(list)
    for row in rows:
        if (row.job_id, row.url) in chains:
            open_rows[(row.job_id, row.url)].append(row)
    changes: list[dict[str, Any]] = []
    for key, e in chains.items():
        changes.extend(_next_moves(e, open_rows.get(key, []), now))
    if not changes:
        return 0
    t = cast(Table, WebhookDelivery.__table__)
    stmt = (
        update(t)
        .where(
            t.c.id == bindparam("b_id"),
            or_(t.c.status == DeliveryStatus.WAITING, t.c.status == DeliveryStatus.PENDING),
        )
        .values(status=bindparam("b_status"), next_attempt_at=bindparam("b_next"), updated_at=now)
    )
    session.connection().execute(stmt, changes)
    return len(changes)


def _next_moves(e: Ended, rows: list[Any], now: datetime) -> list[dict[str, Any]]:
    """The row changes that move one chain on after ``e`` (its open rows in event order)."""

    def move(row: Any, status: str, when: datetime | None) -> dict[str, Any]:
        return {"b_id": row.id, "b_status": status, "b_next": when}

    me = next((r for r in rows if r.event_seq == e.event_seq and r.status == DeliveryStatus.PENDING), None)
    if e.failed and me is None:
        return []  # not ours to move any more (replayed or taken meanwhile)
    if any(r.status in DeliveryStatus.ACTIVE and r is not me for r in rows):
        # Another cursor (a replay) carries the chain: step aside rather than run two at once.
        return [move(me, DeliveryStatus.WAITING, me.next_attempt_at)] if me is not None else []
    after = [r for r in rows if r.event_seq > e.event_seq and r.status == DeliveryStatus.WAITING]
    if after:
        nxt = after[0]
        released = nxt.next_attempt_at is not None and nxt.next_attempt_at <= now
        if not e.failed or (released and not e.pause):
            moves = [move(nxt, DeliveryStatus.PENDING, now)]
            if me is not None:  # failed in this round: waits for the next one
                moves.append(move(me, DeliveryStatus.WAITING, me.next_attempt_at))
            return moves
    # The round is over: back to the first unfinished delivery, everything behind it released for
    # that delivery's next attempt.
    if not rows:
        return []
    head = rows[0]
    when = head.next_attempt_at or now
    moves = [] if head is me and me.next_attempt_at == when else [move(head, DeliveryStatus.PENDING, when)]
    moves.extend(move(r, DeliveryStatus.WAITING, when) for r in rows[1:] if r.next_attempt_at != when)
    return moves


def repair(
    session: Session,
    job_ids: Iterable[str] | None = None,
    *,
    older_than: datetime | None = None,
    newer_than: datetime | None = None,
) -> int:
    """Give every chain that has waiting deliveries but no cursor one: its first waiting delivery,
    due when it was released for (or now). Return how many.

    ``job_ids`` limits it to those jobs; ``older_than`` to rows that have waited a while, so it does
    not race a transaction that is still moving the chain; ``newer_than`` to rows that changed
    recently (a lost cursor is found within seconds, so most sweeps need not read old rows)."""
    d = WebhookDelivery
    other = aliased(WebhookDelivery)
    earlier = aliased(WebhookDelivery)
    has_cursor = (
        select(other.id)
        .where(other.job_id == d.job_id, other.url == d.url, other.status.in_(DeliveryStatus.ACTIVE))
        .exists()
    )
    not_first = (
        select(earlier.id)
        .where(
            earlier.job_id == d.job_id,
            earlier.url == d.url,
            earlier.status == DeliveryStatus.WAITING,
            earlier.event_seq < d.event_seq,
        )
        .exists()
    )
    conditions = [d.status == DeliveryStatus.WAITING, ~has_cursor, ~not_first]
    if job_ids is not None:
        ids = list(job_ids)
        if not ids:
            return 0
        conditions.append(d.job_id.in_(ids))
    if older_than is not None:
        conditions.append(d.updated_at < older_than)
    if newer_than is not None:
        conditions.append(d.updated_at >= newer_than)
    now = utcnow()
    result = session.execute(
        update(d)
        .where(*conditions)
        .values(
            status=DeliveryStatus.PENDING,
            next_attempt_at=func.coalesce(d.next_attempt_at, now),
            updated_at=now,
        ),
        execution_options={"synchronize_session": False},
    )
    return affected(result)


def sweep(session: Session, min_age: float = 2.0, max_age: float | None = None) -> int:
    """Repair chains whose cursor was lost (see the module docstring) among waiting rows last
    changed between ``max_age`` (None: ever) and ``min_age`` seconds ago."""
    now = utcnow()
    newer = None if max_age is None else now - timedelta(seconds=max_age)
    return repair(session, older_than=now - timedelta(seconds=min_age), newer_than=newer)
