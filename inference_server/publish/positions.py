"""Where each queued job stands: ``queue_position`` (jobs of its family that will start before it)
and ``eta_seconds`` (when it should be done), placed by the scheduler every
``QUEUE_POSITION_INTERVAL`` seconds in the scheduler's own order (docs/scheduling.md).

- Jobs already handed to the broker come first, oldest first (the queue is a FIFO); the waiting
  ones follow in ``scheduler.fair_order``. Tenant limits are not simulated: a job of a tenant at its
  limit may start later than its place says.
- ETA: with ``D`` the median run time of the family's last 20 successes (wall time from start to
  end, within 30 minutes), ``S`` the online worker slots and ``R`` the jobs running now,
  ``eta = (position * D + R * D / 2) / S + D``: the work ahead shared by the slots, the running
  jobs half done on average, then its own run. Unknown (None) until the family has a success or
  while no worker is online.

A place is stored (what ``GET /v1/jobs/{id}`` shows) at every change in the first 100 places and
at moves of a tenth further back. It is told, with a ``job.queued`` event that webhooks and streams
carry, only when it changes materially: the first placement with anything ahead, then each time it
crosses 1, 2, 5, 10, 20, 50, 100, ... So a job behind N others gets about three events per tenfold
of N (10 from 1,000 places back), never one per job ahead."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Float, Integer, String, bindparam, cast, column, func, insert, select, update, values
from sqlalchemy.orm import Session

from inference_server.db import JobEvent
from inference_server.db.base import utcnow
from inference_server.events import event_values
from inference_server.jobs.enums import EventType, JobStatus
from inference_server.publish import scheduler
from inference_server.publish.scheduler import JOBS, QUEUED, RUNNING, SchedulerConfig

EXACT_BELOW = 10
RECENT = timedelta(minutes=30)
MAX_WRITES = 500  # per family and pass: a big new backlog is placed over a few passes


def worth_writing(old: int | None, new: int) -> bool:
    """Whether the stored place moves from ``old`` to ``new``: every change in the first 100, by a
    tenth further back (a backlog of thousands is not rewritten on every pass)."""
    if old is None:
        return True
    return new != old and (new < 100 or 10 * abs(new - old) >= old)


def band(position: int) -> int:
    """The largest of 0, 1, 2, 5, 10, 20, 50, 100, ... at most ``position``."""
    if position < 1:
        return 0
    scale = 1
    while scale * 10 <= position:
        scale *= 10
    return max(step * scale for step in (1, 2, 5) if step * scale <= position)


def worth_telling(old: int | None, new: int) -> bool:
    """Whether a move is material, worth a ``job.queued`` event: the first placement with anything
    ahead, then each crossing of 1, 2, 5, 10, 20, 50, 100, ... (about three events per tenfold)."""
    if old is None:
        return new >= 1
    return band(new) != band(old)


def run_time(session: Session, family: str) -> float | None:
    """Median seconds from start to end of the family's last 20 successes (None: none yet)."""
    since = utcnow() - RECENT
    rows = session.execute(
        select(JOBS.c.started_at, JOBS.c.finished_at)
        .where(
            JOBS.c.family == family, JOBS.c.status == JobStatus.SUCCEEDED.value, JOBS.c.finished_at > since
        )
        .order_by(JOBS.c.finished_at.desc())
        .limit(20)
    ).all()
    times = sorted((end - start).total_seconds() for start, end in rows if start and end)
    # The median: a run that loaded its model first, or waited out a retry, is not the norm.
    return times[len(times) // 2] if times else None


def eta(position: int, *, run: float | None, slots: int, running: int) -> float | None:
    if run is None or slots <= 0:
        return None
    return round((position * run + running * run / 2) / slots + run, 1)


def line(session: Session, family: str) -> list[tuple[str, int | None]]:
    """The family's queued jobs in the order they will start: (id, stored position)."""
    handed = (
        select(JOBS.c.id, JOBS.c.queue_position)
        .where(JOBS.c.family == family, JOBS.c.status == QUEUED, ~scheduler._unpublished())
        .order_by(JOBS.c.created_at, JOBS.c.id)
    )
    pending = scheduler.fair_order(family, available_only=False)
    waiting = (
        select(pending.c.job_id, JOBS.c.queue_position)
        .join(JOBS, JOBS.c.id == pending.c.job_id)
        .order_by(*scheduler.order_by(pending))
    )
    seen: set[str] = set()
    order: list[tuple[str, int | None]] = []
    for job_id, stored in [*session.execute(handed), *session.execute(waiting)]:
        if job_id not in seen:  # a job with two unpublished messages is in line once
            seen.add(job_id)
            order.append((job_id, stored))
    return order


def update_family(session: Session, family: str, slots: int) -> int:
    """Place ``family``'s queued jobs; return how many places were written."""
    order = line(session, family)
    changes = [(job_id, old, new) for new, (job_id, old) in enumerate(order) if worth_writing(old, new)]
    changes = changes[:MAX_WRITES]
    if not changes:
        return 0
    run = run_time(session, family)
    running = (
        session.scalar(select(func.count()).where(JOBS.c.family == family, JOBS.c.status == RUNNING)) or 0
    )
    placed = [(job_id, pos, eta(pos, run=run, slots=slots, running=running)) for job_id, _, pos in changes]
    _write_places(session, placed)
    # A job first placed at the head of the line is about to start: its job.started says more.
    told = [job_id for job_id, old, pos in changes if worth_telling(old, pos)]
    if told:
        rows = session.execute(select(JOBS).where(JOBS.c.id.in_(told), JOBS.c.status == QUEUED)).mappings()
        events = [event_values(dict(row), EventType.QUEUED) for row in rows]
        if events:
            session.execute(insert(JobEvent), events)
    return len(changes)


def _write_places(session: Session, placed: list[tuple[str, int, float | None]]) -> None:
    """Store (job id, position, ETA) on the jobs still queued. On PostgreSQL one UPDATE ... FROM
    (VALUES ...): a pass may place hundreds of new jobs while submits pour in, and a statement per
    job would cost the API process (where the scheduler runs) more than the submits themselves."""
    if session.get_bind().dialect.name == "postgresql":
        rows = values(
            column("b_id", String), column("b_pos", Integer), column("b_eta", Float), name="placed"
        ).data(placed)
        session.execute(
            update(JOBS)
            .where(JOBS.c.id == rows.c.b_id, JOBS.c.status == QUEUED)
            .values(queue_position=cast(rows.c.b_pos, Integer), eta_seconds=cast(rows.c.b_eta, Float))
        )
        return
    session.connection().execute(
        update(JOBS)
        .where(JOBS.c.id == bindparam("b_id"), JOBS.c.status == QUEUED)
        .values(queue_position=bindparam("b_pos"), eta_seconds=bindparam("b_eta")),
        [{"b_id": job_id, "b_pos": pos, "b_eta": e} for job_id, pos, e in placed],
    )


def update_all(session: Session, config: SchedulerConfig) -> int:
    """Place the queued jobs of every family; the caller commits."""
    slots = scheduler.worker_slots(session, timeout=config.heartbeat_timeout)
    families = session.scalars(select(JOBS.c.family).where(JOBS.c.status == QUEUED).distinct())
    return sum(update_family(session, family, slots.get(family, 0)) for family in sorted(families))
