"""Retention: the dispatcher deletes what has outlived its settings, in small batches.

- Job events older than ``EVENT_RETENTION_DAYS``, once fanned out and no longer referred to by any
  webhook delivery (so a delivery, open or finished, always has its body; replays keep working).
- Finished webhook deliveries (succeeded, exhausted, gone) older than ``DELIVERY_RETENTION_DAYS``,
  with their attempts. Open deliveries are never pruned: their retry schedule ends first.
- Published outbox rows older than ``OUTBOX_RETENTION_HOURS``; unpublished ones are never touched.
- With ``OUTPUT_RETENTION_DAYS`` or a tenant's own ``output_retention_days``: the output files of
  succeeded jobs finished longer ago, then their output rows; the job stays, stamped
  ``outputs_expired_at`` (shown as ``outputs_expired``; a download then answers 410).

Each batch is one short transaction that examines at most ``PRUNE_BATCH_SIZE`` rows and deletes
only rows it could lock (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so any number of dispatchers
prune side by side without waiting on each other. Tables without an index on their age are walked
in key order, which follows age, and a walk keeps its place between passes. The deliveries walk
starts over once it reaches rows too young to delete, so rows it had to keep (a delivery still
open) are looked at again. Expired outputs are found by their jobs' index on (status, expiry,
finished_at), oldest first. The events walk never goes back: the events it steps
over are those a delivery keeps alive, and the batch that deletes that delivery deletes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, exists, false, or_, select, update
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent, JobOutput, OutboxMessage, Tenant
from inference_server.db.base import utcnow
from inference_server.jobs.enums import JobStatus
from inference_server.settings import Settings
from inference_server.storage import Storage
from webhooks.chain import affected
from webhooks.metrics import PRUNED
from webhooks.tables import DeliveryStatus, WebhookDelivery

log = logging.getLogger(__name__)
Transaction = Callable[[], AbstractContextManager[Session]]
FINISHED = (DeliveryStatus.SUCCEEDED, DeliveryStatus.EXHAUSTED, DeliveryStatus.GONE)


def _age(value: float, unit: timedelta) -> timedelta | None:
    return value * unit if value > 0 else None


def _young(stamp: datetime | None, cutoff: datetime) -> bool:
    # No stamp (an output of a job that never finished) is not young: the walk steps over it.
    return stamp is not None and stamp >= cutoff


class Pruner:
    """``step(budget)`` runs batches for at most ``budget`` seconds and says whether work is left."""

    def __init__(
        self,
        settings: Settings,
        transaction: Transaction,
        *,
        skip_locked: bool,
        storage: Callable[[], Storage] | None = None,
    ) -> None:
        self.transaction = transaction
        self.skip_locked = skip_locked
        self.batch = settings.prune_batch_size
        self.ages = {
            "job_events": _age(settings.event_retention_days, timedelta(days=1)),
            "webhook_deliveries": _age(settings.delivery_retention_days, timedelta(days=1)),
            "outbox": _age(settings.outbox_retention_hours, timedelta(hours=1)),
            # Always looked at: a tenant may have a retention of its own. Its batch gets "now" and
            # applies each tenant's age itself.
            "job_outputs": timedelta(0),
        }
        self.output_age = _age(settings.output_retention_days, timedelta(days=1))
        self._storage_factory = storage
        self._storage: Storage | None = None
        self._cursor: dict[str, Any] = {}  # where each walk stands
        self._batches: dict[str, Callable[[Session, datetime], tuple[int, bool]]] = {
            "webhook_deliveries": self._deliveries,  # before events: they keep events alive
            "job_events": self._events,
            "outbox": self._outbox,
            "job_outputs": self._outputs,
        }

    def step(self, budget: float) -> bool:
        """Prune every table that has a retention until it is caught up or ``budget`` seconds have
        passed; return whether work is left. Each batch commits on its own."""
        deadline = time.monotonic() + budget
        for table, batch in self._batches.items():
            age = self.ages[table]
            if age is None:
                continue
            more = True
            while more:
                if time.monotonic() >= deadline:
                    return True
                with self.transaction() as session:
                    deleted, more = batch(session, utcnow() - age)
                if deleted:
                    PRUNED.labels(table=table).inc(deleted)
                    log.debug("pruned %d rows of %s", deleted, table)
        return False

    # -- the batches: each returns (rows deleted, whether to go on) -------------------------------

    def _lock(self, stmt: Select[Any]) -> Select[Any]:
        return stmt.with_for_update(skip_locked=True) if self.skip_locked else stmt

    def _walk(
        self,
        session: Session,
        table: str,
        window: Select[Any, Any, Any],
        key: Any,
        cutoff: datetime,
        *,
        restart: bool,
    ) -> tuple[list[Any], bool] | None:
        """The next window of a walk in ``key`` order: (conditions that bound it, whether the walk
        goes on at once), or None when it has reached rows younger than ``cutoff``. ``window``
        selects (key, stamp, hold): the walk stops short of a held row. There a ``restart`` walk
        starts over from the oldest rows next time; another keeps its place (the rows it stepped
        over are someone else's to delete)."""
        after = self._cursor.get(table)
        stmt = window if after is None else window.where(key > after)
        rows = session.execute(stmt.order_by(key).limit(self.batch)).all()
        old = []
        for row in rows:
            if _young(row.stamp, cutoff) or row.hold:
                break
            old.append(row)
        more = len(old) == self.batch
        if old and (more or not restart):
            self._cursor[table] = old[-1].key
        elif restart:
            self._cursor.pop(table, None)
        if not old:
            return None
        # Up to and including the last key: rows sharing it beyond the LIMIT belong to this batch.
        last = old[-1].key
        return ([key <= last] if after is None else [key > after, key <= last]), more

    def _deliveries(self, session: Session, cutoff: datetime) -> tuple[int, bool]:
        d = WebhookDelivery
        window = select(d.event_seq.label("key"), d.created_at.label("stamp"), false().label("hold"))
        walk = self._walk(session, "webhook_deliveries", window, d.event_seq, cutoff, restart=True)
        if walk is None:
            return 0, False
        bounds, more = walk
        doomed = select(d.id).where(
            *bounds, d.status.in_(FINISHED), d.created_at < cutoff, d.updated_at < cutoff
        )
        # Attempts go with their delivery (ON DELETE CASCADE): at most one per scheduled attempt.
        seqs = session.execute(delete(d).where(d.id.in_(self._lock(doomed))).returning(d.event_seq))
        freed = set(seqs.scalars())
        events_age = self.ages["job_events"]
        if freed and events_age is not None:
            # The events these deliveries kept alive, if they are old enough: the event walk has
            # stepped over them already.
            gone = self._delete_events(session, [JobEvent.seq.in_(freed)], utcnow() - events_age)
            PRUNED.labels(table="job_events").inc(gone)
        return len(freed), more

    def _events(self, session: Session, cutoff: datetime) -> tuple[int, bool]:
        e = JobEvent
        unfanned = e.fanned_out.is_(False).label("hold")  # the walk never passes an event not fanned out
        window = select(e.seq.label("key"), e.created_at.label("stamp"), unfanned)
        walk = self._walk(session, "job_events", window, e.seq, cutoff, restart=False)
        if walk is None:
            return 0, False
        bounds, more = walk
        return self._delete_events(session, bounds, cutoff), more

    def _delete_events(self, session: Session, where: list[Any], cutoff: datetime) -> int:
        e = JobEvent
        referred = exists().where(WebhookDelivery.event_seq == e.seq)
        doomed = select(e.seq).where(*where, e.created_at < cutoff, e.fanned_out.is_(True), ~referred)
        return affected(session.execute(delete(e).where(e.seq.in_(self._lock(doomed)))))

    def _outbox(self, session: Session, cutoff: datetime) -> tuple[int, bool]:
        o = OutboxMessage
        # The index of unpublished rows is on (published_at, id): old published rows come first.
        doomed = select(o.id).where(o.published_at < cutoff).order_by(o.published_at).limit(self.batch)
        deleted = affected(session.execute(delete(o).where(o.id.in_(self._lock(doomed)))))
        return deleted, deleted >= self.batch

    def _outputs(self, session: Session, now: datetime) -> tuple[int, bool]:
        expired = self._expired_jobs(session, now)
        if expired is None:
            return 0, False
        jobs = select(Job.id).where(
            Job.status == JobStatus.SUCCEEDED, Job.outputs_expired_at.is_(None), expired
        )
        jobs = jobs.order_by(Job.finished_at).limit(self.batch)
        if self.skip_locked:
            jobs = jobs.with_for_update(skip_locked=True)
        ids = list(session.scalars(jobs))
        if not ids:
            return 0, False
        found = session.scalars(select(JobOutput.uri).where(JobOutput.job_id.in_(ids)))
        uris = [u for u in found if u]  # a blocked output stored nothing
        # Files first, rows after: a crash in between leaves rows whose files are gone and the next
        # pass finishes the work; never files no row lists.
        if uris:
            self.storage().delete(uris)
        session.execute(delete(JobOutput).where(JobOutput.job_id.in_(ids)))
        session.execute(update(Job).where(Job.id.in_(ids)).values(outputs_expired_at=now))
        return len(uris), len(ids) == self.batch

    def _expired_jobs(self, session: Session, now: datetime) -> ColumnElement[bool] | None:
        """Which jobs have outlived their tenant's retention (None: no tenant has one). Tenants with
        a retention of their own are few (an operator sets each): one condition apiece."""
        t = Tenant
        has_own = t.output_retention_days.is_not(None)
        rows = session.execute(select(t.id, t.output_retention_days).where(has_own))
        own = {tenant_id: float(days or 0) for tenant_id, days in rows}
        clauses = [
            and_(Job.tenant_id == tenant_id, Job.finished_at < now - timedelta(days=days))
            for tenant_id, days in own.items()
            if days > 0  # 0: that tenant keeps its outputs
        ]
        if self.output_age is not None:
            rest = Job.finished_at < now - self.output_age
            clauses.append(and_(Job.tenant_id.not_in(own), rest) if own else rest)
        return or_(*clauses) if clauses else None

    def storage(self) -> Storage:
        if self._storage is None:
            if self._storage_factory is None:
                raise RuntimeError("output retention is on but the pruner was given no storage")
            self._storage = self._storage_factory()
        return self._storage
