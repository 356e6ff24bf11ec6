"""The scheduler: which queued jobs the relay publishes now, and in what order.

RabbitMQ's quorum queues (3.10) have no priorities and a FIFO cannot be fair, so the queue lives in
PostgreSQL: a job's outbox row stays unpublished until the scheduler picks it. Per family it
publishes only as many messages as the family's online workers have free slots, plus a small
headroom (a worker that finishes a job finds the next one already in its queue), in this order:

1. priority: high, then normal, then low;
2. fair share within a priority: a tenant's k-th waiting job goes in round k plus the number of its
   jobs the family already runs (or has handed out), so a tenant with one job waits behind at most
   one job of each other tenant, never behind another tenant's backlog; within a round, the tenant
   served longest ago in the family first (``scheduler_turns``);
3. age.

A tenant at its ``max_concurrent`` jobs (running, or published and not yet started, in every
family) is skipped without blocking the others. See docs/scheduling.md.

Several API and dispatcher replicas run the relay: a pass holds a transaction-scoped advisory lock,
so one replica schedules at a time (the others skip that pass) and the tenant limits hold across
families. Everything it decides is in the database in the same transaction as the outbox stamps, so
a scheduler killed mid-pass loses nothing: its transaction rolls back and the next pass starts over
(a message confirmed but not stamped is published again, which the worker's claim tolerates)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, case, exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from inference_server.db import Job, OutboxMessage, SchedulerTurn, Tenant, WorkerHeartbeat
from inference_server.db.base import utcnow
from inference_server.jobs.enums import JobStatus
from inference_server.settings import Settings

JOBS = cast(Table, Job.__table__)
OUTBOX = cast(Table, OutboxMessage.__table__)
TENANTS = cast(Table, Tenant.__table__)
BEATS = cast(Table, WorkerHeartbeat.__table__)
TURNS = cast(Table, SchedulerTurn.__table__)

# pg_try_advisory_xact_lock key of the scheduling pass ("sched" in ASCII).
LOCK_KEY = 0x7363686564
QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value


@dataclass(frozen=True)
class SchedulerConfig:
    headroom: int = 1
    headroom_per_slot: float = 0.1
    idle_window: int = 2
    heartbeat_timeout: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SchedulerConfig:
        return cls(
            headroom=settings.scheduler_headroom,
            headroom_per_slot=settings.scheduler_headroom_per_slot,
            idle_window=settings.scheduler_idle_window,
            heartbeat_timeout=settings.worker_heartbeat_timeout,
        )

    def budget(self, slots: int, in_flight: int) -> int:
        """How many more messages a family with ``slots`` online worker slots and ``in_flight``
        jobs (running, or published and not started) may be given now."""
        if slots <= 0:
            return max(0, self.idle_window - in_flight)
        headroom = max(self.headroom, math.ceil(slots * self.headroom_per_slot))
        return max(0, slots + headroom - in_flight)


def take_lock(session: Session) -> bool:
    """Whether this transaction may schedule now (PostgreSQL: no other replica is; SQLite runs one
    process, whose writers the database serialises anyway)."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": LOCK_KEY}))


def _unpublished() -> Any:
    return exists().where(OUTBOX.c.job_id == JOBS.c.id, OUTBOX.c.published_at.is_(None))


def holding_a_slot() -> Any:
    """A job that holds a worker slot or is on its way to one: running, or queued with every
    message it has published (a queued job whose message is still unpublished waits here)."""
    return or_(JOBS.c.status == RUNNING, and_(JOBS.c.status == QUEUED, ~_unpublished()))


def _denoised() -> Any:
    """A running job whose denoising ended (its last step recorded): it is being finished (encoded,
    uploaded, recorded) beside the next job, so it no longer holds its worker's slot."""
    return and_(JOBS.c.progress_total > 0, JOBS.c.progress_step >= JOBS.c.progress_total)


def worker_slots(session: Session, *, timeout: float) -> dict[str, int]:
    """Slots of the online workers (heard from within ``timeout`` seconds) per family they serve.
    A worker of several families counts for each: the budget errs towards a message too many, which
    waits in its queue, never towards an idle worker."""
    since = utcnow() - timedelta(seconds=timeout)
    slots: dict[str, int] = {}
    for families, n in session.execute(
        select(BEATS.c.families, BEATS.c.slots).where(BEATS.c.last_seen > since)
    ):
        for family in families or []:
            slots[family] = slots.get(family, 0) + int(n)
    return slots


def in_flight(session: Session) -> dict[str, int]:
    """Jobs occupying a slot per family: ``holding_a_slot`` less the jobs in a worker's finisher
    (they must not keep their slot's next job from being published, or the worker would wait for
    its finisher after all; the finisher's own bound, ``FINISH_IN_FLIGHT``, stops a worker from
    taking more than it can finish). A batch's members count as one job: they share one pipeline
    call, so they hold one slot together (workers/batching.py), and the slot is free as soon as one
    member's last step is recorded (they all end together; one of them writes it for the call)."""
    seat = func.coalesce(JOBS.c.batch_id, JOBS.c.id).label("seat")
    finishing = case((and_(JOBS.c.status == RUNNING, _denoised()), 1), else_=0)
    seats = (
        select(JOBS.c.family, seat)
        .where(holding_a_slot())
        .group_by(JOBS.c.family, seat)
        .having(func.max(finishing) == 0)
        .subquery("seats")
    )
    rows = session.execute(select(seats.c.family, func.count()).group_by(seats.c.family))
    return {family: int(n) for family, n in rows}


def _available(now: Any) -> Any:
    return and_(
        OUTBOX.c.published_at.is_(None),
        or_(OUTBOX.c.available_at.is_(None), OUTBOX.c.available_at <= now),
    )


def waiting_families(session: Session) -> list[str]:
    """Families with a queued job whose message may be published now."""
    query = (
        select(JOBS.c.family)
        .select_from(OUTBOX.join(JOBS, JOBS.c.id == OUTBOX.c.job_id))
        .where(_available(utcnow()), JOBS.c.status == QUEUED)
        .distinct()
    )
    return sorted(session.scalars(query))


def _per_tenant(where: Any, name: str) -> Any:
    query = select(JOBS.c.tenant_id, func.count().label("n")).where(where).group_by(JOBS.c.tenant_id)
    return query.subquery(name)


def fair_order(family: str, *, available_only: bool = True) -> Any:
    """The family's waiting jobs (one row per unpublished outbox row) with their sort key, as a
    subquery: ``round`` (fair share within a priority) and ``load`` (the tenant's jobs holding a
    slot anywhere, with this one and its own earlier ones, against ``max_concurrent``)."""
    limited = select(TENANTS.c.id).where(TENANTS.c.max_concurrent.is_not(None))
    in_family = _per_tenant(and_(JOBS.c.family == family, holding_a_slot()), "in_family")
    everywhere = _per_tenant(and_(JOBS.c.tenant_id.in_(limited), holding_a_slot()), "everywhere")
    round_ = func.row_number().over(
        partition_by=(JOBS.c.tenant_id, JOBS.c.priority), order_by=(JOBS.c.created_at, JOBS.c.id)
    ) + func.coalesce(in_family.c.n, 0)
    load = func.row_number().over(
        partition_by=JOBS.c.tenant_id, order_by=(JOBS.c.priority.desc(), JOBS.c.created_at, JOBS.c.id)
    ) + func.coalesce(everywhere.c.n, 0)
    waiting = _available(utcnow()) if available_only else OUTBOX.c.published_at.is_(None)
    return (
        select(
            OUTBOX.c.id,
            OUTBOX.c.job_id,
            OUTBOX.c.queue,
            JOBS.c.tenant_id,
            JOBS.c.priority,
            JOBS.c.created_at,
            round_.label("round"),
            load.label("load"),
            TENANTS.c.max_concurrent,
            TURNS.c.served_at,
        )
        .select_from(
            OUTBOX.join(JOBS, JOBS.c.id == OUTBOX.c.job_id)
            .join(TENANTS, TENANTS.c.id == JOBS.c.tenant_id)
            .outerjoin(in_family, in_family.c.tenant_id == JOBS.c.tenant_id)
            .outerjoin(everywhere, everywhere.c.tenant_id == JOBS.c.tenant_id)
            .outerjoin(TURNS, and_(TURNS.c.family == family, TURNS.c.tenant_id == JOBS.c.tenant_id))
        )
        .where(waiting, JOBS.c.family == family, JOBS.c.status == QUEUED)
        .subquery("waiting")
    )


def order_by(pending: Any) -> tuple[Any, ...]:
    """Priority, round, then the tenant served longest ago (never served: first), then age. The
    turn matters when a slot frees with nothing in flight: every backlogged tenant's next job is
    then in round 1, and age alone would always pick the oldest backlog."""
    return (
        pending.c.priority.desc(),
        pending.c.round,
        pending.c.served_at.asc().nulls_first(),
        pending.c.created_at,
        pending.c.job_id,
    )


def choose(session: Session, family: str, budget: int) -> list[Any]:
    """Up to ``budget`` outbox rows (id, job_id, queue) of ``family`` to publish now, in order,
    skipping tenants at their concurrency limit."""
    if budget <= 0:
        return []
    pending = fair_order(family)
    allowed = or_(pending.c.max_concurrent.is_(None), pending.c.load <= pending.c.max_concurrent)
    query = select(pending.c.id, pending.c.job_id, pending.c.queue, pending.c.tenant_id).where(allowed)
    return list(session.execute(query.order_by(*order_by(pending)).limit(budget)))


def lock_chosen(session: Session, rows: list[Any]) -> list[Any]:
    """Of ``rows`` (from ``choose``), those still unpublished whose outbox rows this transaction
    now locks, in order. A worker gathering a batch (workers/batching.py) locks the unsent
    messages of the jobs it takes and deletes them; a message locked here is one it leaves, and
    with it that job, so a job is never both published and taken into a batch (its delivery
    would only be refused)."""
    if not rows or session.get_bind().dialect.name != "postgresql":
        return rows
    locked = set(
        session.scalars(
            select(OUTBOX.c.id)
            .where(OUTBOX.c.id.in_([r.id for r in rows]), OUTBOX.c.published_at.is_(None))
            .with_for_update(skip_locked=True)
        )
    )
    return [r for r in rows if r.id in locked]


def stamp(session: Session, family: str, rows: list[Any]) -> None:
    """Mark ``rows`` (from ``choose``) published and their tenants served now; their jobs'
    ``updated_at`` restarts the reconciler's lost-message grace from now (a job may have waited
    here far longer than that grace)."""
    if not rows:
        return
    now = utcnow()
    for tenant_id in sorted({r.tenant_id for r in rows}):
        # Under the scheduling lock (or SQLite's single writer): no other pass races this write.
        turn = {"family": family, "tenant_id": tenant_id}
        served = session.execute(
            update(TURNS)
            .where(TURNS.c.family == family, TURNS.c.tenant_id == tenant_id)
            .values(served_at=now)
        )
        if not served.rowcount:  # type: ignore[attr-defined]
            session.execute(TURNS.insert().values(**turn, served_at=now))
    session.execute(
        update(OutboxMessage).where(OutboxMessage.id.in_([r.id for r in rows])).values(published_at=now)
    )
    jobs = sorted({r.job_id for r in rows})
    session.execute(update(Job).where(Job.id.in_(jobs), Job.status == QUEUED).values(updated_at=now))


def drop_stale(session: Session) -> int:
    """Stamp, without publishing, unpublished messages of jobs that are no longer queued (canceled
    while they waited, or started from an earlier message): nobody needs them."""
    stale = select(JOBS.c.id).where(JOBS.c.id == OUTBOX.c.job_id, JOBS.c.status != QUEUED).exists()
    result = session.execute(
        update(OutboxMessage).where(OutboxMessage.published_at.is_(None), stale).values(published_at=utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def online_workers(session: Session, *, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Per family, the workers heard from within ``timeout`` seconds, as ``GET /v1/models`` shows
    them. GPU memory is in bytes, None on a CPU worker."""
    since = utcnow() - timedelta(seconds=timeout)
    found: dict[str, list[dict[str, Any]]] = {}
    for row in session.execute(
        select(BEATS).where(BEATS.c.last_seen > since).order_by(BEATS.c.name)
    ).mappings():
        view = {
            "name": row["name"],
            "device": row["device"],
            "slots": row["slots"],
            "busy": row["busy"],
            "gpu_memory_total": row["gpu_memory_total"],
            "gpu_memory_free": row["gpu_memory_free"],
            "last_seen": row["last_seen"].isoformat().replace("+00:00", "Z"),
        }
        for family in row["families"] or []:
            found.setdefault(family, []).append(view)
    return found
