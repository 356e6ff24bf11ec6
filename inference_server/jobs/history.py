"""Reading stored job events back: a job's history, a tenant's events after a point, and the scan by
sequence number that feeds the API's live streams (``api/feed.py``).

Within one job, sequence order is commit order: every transaction that adds a job's event first
writes (and so locks) the job's row, and takes its sequence number while holding that lock. Across
jobs it is not: a transaction may take a lower number and commit after one with a higher number.
``scan`` therefore reports the numbers it has not seen yet (gaps) so the next scan looks again."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, or_, select

from inference_server.db import Job, JobEvent
from inference_server.jobs.enums import TERMINAL, TERMINAL_EVENTS, JobStatus

EVENTS = JobEvent.__table__


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One ``job_events`` row as the streams carry it; ``payload`` is the webhook body."""

    seq: int
    id: str
    job_id: str
    tenant_id: str
    type: str
    payload: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


_COLUMNS = (EVENTS.c.seq, EVENTS.c.id, EVENTS.c.job_id, EVENTS.c.tenant_id, EVENTS.c.type, EVENTS.c.payload)


def _events(rows: Sequence[Any]) -> list[StoredEvent]:
    return [StoredEvent(r.seq, r.id, r.job_id, r.tenant_id, r.type, r.payload) for r in rows]


def job_status(conn: Connection, tenant_id: str, job_id: str) -> JobStatus | None:
    """The job's status, or None when there is no such job of this tenant."""
    row = conn.execute(select(Job.status, Job.tenant_id).where(Job.id == job_id)).first()
    if row is None or row.tenant_id != tenant_id:
        return None
    return JobStatus(row.status)


def job_events(conn: Connection, job_id: str, *, after: int = 0, limit: int = 500) -> list[StoredEvent]:
    """The job's events with a sequence number above ``after``, in order, at most ``limit``."""
    query = select(*_COLUMNS).where(EVENTS.c.job_id == job_id, EVENTS.c.seq > after)
    return _events(conn.execute(query.order_by(EVENTS.c.seq).limit(limit)).all())


def job_page(
    conn: Connection, tenant_id: str, job_id: str, *, after: int = 0, limit: int = 500
) -> tuple[JobStatus | None, list[StoredEvent]]:
    """The job's status (None: not this tenant's job) and its events after ``after``. The status is
    read first: when it is terminal, the terminal event (committed with it) is among the events
    unless it is at or before ``after``."""
    status = job_status(conn, tenant_id, job_id)
    return status, ([] if status is None else job_events(conn, job_id, after=after, limit=limit))


def finished(status: JobStatus | None) -> bool:
    return status is not None and status in TERMINAL


def tenant_events(conn: Connection, tenant_id: str, *, after: int, limit: int = 500) -> list[StoredEvent]:
    """The tenant's events with a sequence number above ``after``, in order, at most ``limit``."""
    query = select(*_COLUMNS).where(EVENTS.c.tenant_id == tenant_id, EVENTS.c.seq > after)
    return _events(conn.execute(query.order_by(EVENTS.c.seq).limit(limit)).all())


def last_seq(conn: Connection) -> int:
    """The highest sequence number committed so far (0 for none)."""
    return int(conn.execute(select(EVENTS.c.seq).order_by(EVENTS.c.seq.desc()).limit(1)).scalar() or 0)


@dataclass
class Scan:
    """What one ``scan`` found: the new high-water mark, numbers still missing below it, and the
    newly visible events of the jobs and tenants asked for."""

    high: int
    missing: list[int]
    events: list[StoredEvent]
    full: bool  # the batch limit was reached: scan again at once
    low: int = 0  # the high-water mark the scan started from
    appeared: list[int] = field(default_factory=list)  # numbers missing before, committed now

    @property
    def found_any(self) -> bool:
        return self.high > self.low or bool(self.appeared)


def scan(
    conn: Connection,
    high: int,
    missing: Collection[int],
    *,
    jobs: Collection[str],
    tenants: Collection[str],
    batch: int = 5000,
) -> Scan:
    """Events committed since the last scan: numbers above ``high`` and the ``missing`` ones that
    have appeared since. Only the numbers are read for all jobs (an index-only range); full rows
    only for ``jobs`` and ``tenants``."""
    missing = list(missing)
    where = EVENTS.c.seq > high
    if missing:
        where = or_(where, EVENTS.c.seq.in_(missing))
    numbers = select(EVENTS.c.seq).where(where).order_by(EVENTS.c.seq).limit(batch)
    found = list(conn.execute(numbers).scalars())
    new = [s for s in found if s > high]
    top = new[-1] if new else high
    appeared = set(found) - set(new)
    seen = set(new)
    still_missing = [s for s in missing if s not in appeared]
    still_missing += [s for s in range(high + 1, top) if s not in seen]
    result = Scan(top, still_missing, [], full=len(found) >= batch, low=high, appeared=sorted(appeared))
    result.events = found_events(conn, result, jobs=jobs, tenants=tenants)
    return result


def found_events(
    conn: Connection, found: Scan, *, jobs: Collection[str], tenants: Collection[str]
) -> list[StoredEvent]:
    """The events of ``jobs`` and ``tenants`` among those ``found`` newly visible. Matched here on
    their ids, then read in full: a process may hold streams of a thousand jobs, and a query naming
    them all would cost more than the few new rows it filters."""
    if not found.found_any or not (jobs or tenants):
        return []
    parts: list[ColumnElement[bool]] = []
    if found.high > found.low:
        parts.append(EVENTS.c.seq.between(found.low + 1, found.high))
    if found.appeared:
        parts.append(EVENTS.c.seq.in_(found.appeared))
    keys = select(EVENTS.c.seq, EVENTS.c.job_id, EVENTS.c.tenant_id).where(or_(*parts))
    jobs, tenants = set(jobs), set(tenants)
    wanted = [r.seq for r in conn.execute(keys) if r.job_id in jobs or r.tenant_id in tenants]
    if not wanted:
        return []
    query = select(*_COLUMNS).where(EVENTS.c.seq.in_(wanted)).order_by(EVENTS.c.seq)
    return _events(conn.execute(query).all())
