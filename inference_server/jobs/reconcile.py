"""The reconciler: the database decides what runs, so it also finds what stopped running.

- A running job whose lease expired (its worker died, hung, or lost the database) is queued again
  through the outbox, or failed ``too_many_attempts`` once it has had ``JOB_MAX_ATTEMPTS`` attempts.
- A queued job whose message was lost (acknowledged by a worker that died before its claim was
  written, or dropped by a broker) is published again: when it has waited ``LOST_MESSAGE_GRACE``
  and its queue holds no ready message, no message for it can still be on the way.

It runs in every dispatcher (and in ``up``). Rows are taken ``FOR UPDATE SKIP LOCKED`` in small
batches, so any number of replicas share the work; a duplicate message is harmless anyway, since a
claim is conditional on the job's status and lease."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Job, OutboxMessage
from inference_server.db.base import utcnow
from inference_server.jobs import transitions
from inference_server.jobs.enums import JobStatus
from inference_server.publish.topology import default_queue
from inference_server.settings import Settings

log = logging.getLogger(__name__)

JOBS = Job.__table__
OUTBOX = OutboxMessage.__table__


@dataclass
class Pass:
    """What one reconciler pass did."""

    requeued: int = 0
    failed: int = 0
    republished: int = 0


def _last_queue(job: Any) -> Any:
    """The queue the job's newest message went to (its family's queue if pruned)."""
    newest = select(OUTBOX.c.queue).where(OUTBOX.c.job_id == job.c.id).order_by(OUTBOX.c.id.desc()).limit(1)
    return newest.scalar_subquery()


def expired_leases(session: Session, *, max_attempts: int, batch: int = 100) -> Pass:
    """Queue again, or fail, up to ``batch`` running jobs whose lease has expired; the caller's
    session commits each job's change with its event and outbox message."""
    now = utcnow()
    rows = (
        session.execute(
            select(JOBS, _last_queue(JOBS).label("last_queue"))
            .where(JOBS.c.status == JobStatus.RUNNING.value, JOBS.c.lease_expires_at < now)
            .order_by(JOBS.c.lease_expires_at)
            .limit(batch)
            .with_for_update(skip_locked=True, of=JOBS)
        )
        .mappings()
        .all()
    )
    done = Pass()
    for found in rows:
        row = {k: v for k, v in found.items() if k != "last_queue"}
        if row["attempts"] >= max_attempts:
            transitions.fail_exhausted(session, row, owned=True)
            done.failed += 1
            continue
        transitions.requeue(session, row, queue=found["last_queue"] or default_queue(row["family"]))
        holder = row["worker"] or "unknown worker"
        log.warning("job %s: attempt %d lost its lease (%s)", row["id"], row["attempts"], holder)
        done.requeued += 1
    return done


def lost_messages(
    session: Session, ready: Callable[[list[str]], dict[str, int | None]], *, grace: float, batch: int = 200
) -> int:
    """Publish again up to ``batch`` queued jobs idle for ``grace`` seconds whose messages were all
    published and whose queue ``ready`` reports empty (None: unknown, left alone)."""
    now = utcnow()
    unpublished = exists().where(OUTBOX.c.job_id == JOBS.c.id, OUTBOX.c.published_at.is_(None))
    rows = session.execute(
        select(JOBS.c.id, JOBS.c.family, _last_queue(JOBS).label("last_queue"))
        .where(
            and_(
                JOBS.c.status == JobStatus.QUEUED.value,
                JOBS.c.updated_at < now - timedelta(seconds=grace),
                ~unpublished,
            )
        )
        .order_by(JOBS.c.created_at)
        .limit(batch)
        .with_for_update(skip_locked=True, of=JOBS)
    ).all()
    if not rows:
        return 0
    queues = {row.id: row.last_queue or default_queue(row.family) for row in rows}
    depth = ready(sorted(set(queues.values())))
    lost = [job_id for job_id, queue in queues.items() if depth.get(queue) == 0]
    for job_id in lost:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=now))
        message = {"job_id": job_id, "queue": queues[job_id], "created_at": now, "publish_attempts": 0}
        session.execute(insert(OutboxMessage).values(message))
    if lost:
        log.warning("%d queued jobs had no message left in their queue; published again", len(lost))
    return len(lost)


class Reconciler:
    """Runs the passes above every ``RECONCILE_INTERVAL`` seconds until stopped."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        ready: Callable[[list[str]], dict[str, int | None]],
        *,
        on_published: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.sf = session_factory
        self.ready = ready
        self.on_published = on_published

    def run_once(self) -> Pass:
        with self.sf() as session:
            done = expired_leases(session, max_attempts=self.settings.job_max_attempts)
            session.commit()
        with self.sf() as session:
            done.republished = lost_messages(session, self.ready, grace=self.settings.lost_message_grace)
            session.commit()
        if (done.requeued or done.republished) and self.on_published:
            self.on_published()
        return done

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.reconcile_interval):
            try:
                self.run_once()
            except Exception as exc:  # the database or broker is down: the next pass tries again
                log.warning("reconciler: %s", exc)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="reconciler", daemon=True)
        thread.start()
        return thread
