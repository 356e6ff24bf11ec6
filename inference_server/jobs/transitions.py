"""A worker's transitions of a job: claim it under a lease, renew the lease, then succeed, fail, or
release it back to its queue. Each is one transaction that changes the job, writes its event (and
outputs, or the outbox message of a release) and, for an end, wakes long-polling requests.

Every write after the claim is conditional on this attempt still owning the running job, so a
duplicate message, a late worker or a reconciler's re-queue can never record an end twice.

They sit between a GPU finishing one job and starting the next, so they are plain statements on
plain rows (see ``jobs.persist``), not ORM unit-of-work: on PostgreSQL a claim is a locking read and
one write, a success or failure one conditional write."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent, JobOutput, OutboxMessage
from inference_server.db.base import utcnow
from inference_server.events import JOB_EVENTS_CHANNEL, JOB_FINISHED_CHANNEL, event_values, finished_notice
from inference_server.jobs.enums import TERMINAL, ClaimRefusal, EventType, JobStatus, Task
from inference_server.jobs.persist import update_with_rows
from inference_server.jobs.spec import JobSpec

JOBS = Job.__table__


@dataclass
class Claim:
    """A job as this attempt claimed it. Nothing but this attempt changes the job's other columns
    while it runs, so its end is written from this snapshot instead of being read back."""

    row: dict[str, Any]
    spec: JobSpec
    unwritten: dict[str, Any] | None = None  # the claim's changes, until record_claim writes them

    @property
    def job_id(self) -> str:
        return str(self.row["id"])

    @property
    def attempt(self) -> int:
        return int(self.row["attempts"])

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def task(self) -> Task:
        return self.spec.task


def claim(
    session: Session, job_id: str, *, max_attempts: int, lease_seconds: float, worker: str | None = None
) -> Claim | ClaimRefusal:
    """Lock ``job_id`` and decide whether this attempt may run it. Return the claim, its row lock
    held and not yet written (``record_claim`` writes and commits it), or why not (running out of
    attempts, or a stored spec that does not validate, fails the job, committed here).

    A running job whose lease has expired is taken over: its worker died or lost the database."""
    found = session.execute(select(JOBS).where(JOBS.c.id == job_id).with_for_update()).mappings().first()
    if found is None:
        return ClaimRefusal.MISSING
    row = dict(found)
    if JobStatus(row["status"]) in TERMINAL:
        return ClaimRefusal.FINISHED
    now = utcnow()
    lease = row["lease_expires_at"]
    if row["status"] == JobStatus.RUNNING and lease is not None and lease > now:
        return ClaimRefusal.OWNED  # a duplicate message while its owner still runs it
    if row["attempts"] >= max_attempts:
        fail_exhausted(session, row)
        session.commit()
        return ClaimRefusal.EXHAUSTED
    try:
        # Validated again on this side of the queue: a row written by hand or by an incompatible
        # release fails here with a reason, not deep inside the pipeline, and no attempt is spent.
        spec = JobSpec.model_validate(row["params"])
    except ValidationError as exc:
        message = f"the stored job cannot be run: {exc.errors()[0]['msg']}"
        _fail_row(session, row, code="invalid_job_spec", message=message)
        session.commit()
        return ClaimRefusal.INVALID
    changes = {
        "status": JobStatus.RUNNING.value,
        "attempts": row["attempts"] + 1,
        "started_at": row["started_at"] or now,
        "progress_step": 0,
        "eta_seconds": None,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "worker": worker,
        "updated_at": now,
        # A new attempt runs alone until a batch says otherwise (workers.batching).
        "batch_id": None,
        "batch_size": None,
    }
    return Claim({**row, **changes}, spec, unwritten=changes)


def fail_exhausted(session: Session, row: dict[str, Any], *, owned: bool = False) -> bool:
    """Fail the job ``row`` ``too_many_attempts``; the caller commits. ``owned``: only if its last
    attempt still holds it (the reconciler's case), else whatever attempt it is at (the claim's)."""
    message = f"the job was started {row['attempts']} times without finishing"
    return _fail_row(session, row, code="too_many_attempts", message=message, owned=owned)


def _fail_row(session: Session, row: dict[str, Any], *, code: str, message: str, owned: bool = False) -> bool:
    now = utcnow()
    changes = {
        "status": JobStatus.FAILED.value,
        "error_code": code,
        "error_message": message,
        "finished_at": now,
        "eta_seconds": None,
        "lease_expires_at": None,
        "updated_at": now,
    }
    return _write(session, row, changes, EventType.FAILED, where=_owner(row) if owned else None)


def _owner(row: dict[str, Any]) -> dict[str, Any]:
    """The condition that the attempt ``row`` records still runs the job."""
    return {"id": row["id"], "status": JobStatus.RUNNING.value, "attempts": row["attempts"]}


def record_claim(session: Session, claim: Claim) -> None:
    """Write the claim ``claim`` decided in ``session`` (whose transaction holds the row lock), with
    its ``job.started`` event, and commit."""
    record_claims(session, [claim])


def record_claims(session: Session, claims: list[Claim]) -> None:
    """Write several claims decided in ``session`` (its transaction holding their row locks), each
    with its ``job.started`` event, and commit them together: committing one at a time would
    release the others' locks before they are written."""
    for claim in claims:
        assert claim.unwritten is not None, "record_claims takes claims fresh from claim()"
        _write(session, claim.row, claim.unwritten, EventType.STARTED)
    session.commit()
    for claim in claims:
        claim.unwritten = None


def succeed(
    session: Session, claim: Claim, outputs: list[dict[str, Any]], *, steps: int | None = None
) -> bool:
    """Record ``outputs`` (job_outputs columns) and success together and commit, if this attempt
    still owns the running job; return whether it did (a cancel or a newer attempt wins otherwise).

    ``steps``: the denoising steps the run took, as the engine counted them; the job ends at
    ``steps/steps`` (the planned total when not given)."""
    return succeed_all(session, [(claim, outputs, steps)])[0]


def succeed_all(
    session: Session, runs: Sequence[tuple[Claim, list[dict[str, Any]], int | None]]
) -> list[bool]:
    """``succeed`` for several runs (claim, outputs, steps) in one transaction, as a batch's
    members end together: each is written only if its attempt still owns its job, and one refused
    leaves the others written. Return, in order, whether each was."""
    done = [
        _write(
            session, claim.row, _success(claim, steps), EventType.SUCCEEDED, outputs, where=_owner(claim.row)
        )
        for claim, outputs, steps in runs
    ]
    if any(done):
        session.commit()
    else:
        session.rollback()
    return done


def _success(claim: Claim, steps: int | None) -> dict[str, Any]:
    now = utcnow()
    # The engine's count can differ from the plan (a pipeline rounding steps x strength its own
    # way), and the watcher may have saved either: step and total are written together.
    total = steps or claim.row["progress_total"]
    return {
        "status": JobStatus.SUCCEEDED.value,
        "finished_at": now,
        "updated_at": now,
        "eta_seconds": 0.0,
        "progress_step": total,
        "progress_total": total,
        "lease_expires_at": None,
    }


def fail(session: Session, claim: Claim, code: str, message: str) -> bool:
    """Record the failure of this attempt and commit, if it still owns the running job."""
    now = utcnow()
    # The progress the job had reached, for the event: the watcher saved it after the claim.
    step = session.scalar(select(JOBS.c.progress_step).where(JOBS.c.id == claim.job_id))
    changes = {
        "status": JobStatus.FAILED.value,
        "finished_at": now,
        "updated_at": now,
        "error_code": code,
        "error_message": message[:2000],
        "eta_seconds": None,
        "progress_step": step or 0,
        "lease_expires_at": None,
    }
    return _end(session, claim, changes, EventType.FAILED, [])


def release(session: Session, claim: Claim, *, queue: str, delay: float, uncount: bool = False) -> bool:
    """Put the job back in its queue after a transient failure of this attempt (see ``requeue``)
    and commit; return whether this attempt still owned the job (a cancel or a newer attempt wins
    otherwise). ``uncount``: the attempt never ran (workers/ahead.py: claimed for a message that
    went elsewhere), so it is not counted."""
    done = requeue(session, claim.row, queue=queue, delay=delay, uncount=uncount)
    if done:
        session.commit()
    else:
        session.rollback()
    return done


def requeue(
    session: Session, row: dict[str, Any], *, queue: str, delay: float = 0.0, uncount: bool = False
) -> bool:
    """Queue the job again, if the attempt ``row`` records still runs it: its lease dropped, its
    message in the outbox for ``queue``, published after ``delay`` seconds, and a ``job.queued``
    event (``uncount``: that attempt did not run, and is not counted). The caller commits."""
    now = utcnow()
    changes = {
        "status": JobStatus.QUEUED.value,
        "updated_at": now,
        "progress_step": 0,
        "eta_seconds": None,
        "lease_expires_at": None,
        "worker": None,
        # Alone again: a batch's members queued again each hold a slot once published.
        "batch_id": None,
        "batch_size": None,
    }
    if uncount:
        changes["attempts"] = row["attempts"] - 1
    later = now + timedelta(seconds=delay) if delay else None
    message = {"job_id": row["id"], "queue": queue, "created_at": now, "available_at": later}
    message["publish_attempts"] = 0
    rows: list[tuple[type[Any], dict[str, Any]]] = [
        (OutboxMessage, message),
        (JobEvent, event_values({**row, **changes}, EventType.QUEUED)),
    ]
    return update_with_rows(session, Job, _owner(row), changes, rows, notify=(JOB_EVENTS_CHANNEL, row["id"]))


def renew(session: Session, job_id: str, attempt: int, *, lease_seconds: float) -> bool:
    """Extend this attempt's lease; return whether it still owns the running job."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.attempts == attempt)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _end(
    session: Session,
    claim: Claim,
    changes: dict[str, Any],
    event_type: EventType,
    outputs: list[dict[str, Any]],
) -> bool:
    done = _write(session, claim.row, changes, event_type, outputs, where=_owner(claim.row))
    if done:
        session.commit()
    else:
        session.rollback()
    return done


def _write(
    session: Session,
    row: dict[str, Any],
    changes: dict[str, Any],
    event_type: EventType,
    outputs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    *,
    where: dict[str, Any] | None = None,
) -> bool:
    """Apply ``changes`` to the job ``row`` (under ``where``), with its outputs and event."""
    job = {**row, **changes}
    event = event_values(job, event_type, outputs)
    notify = (JOB_EVENTS_CHANNEL, str(row["id"]))  # event streams; a terminal event wakes waiters too
    if JobStatus(job["status"]) in TERMINAL:
        notify = (JOB_FINISHED_CHANNEL, finished_notice(event["payload"]["data"]))
    rows: list[tuple[type[Any], dict[str, Any]]] = [(JobOutput, o) for o in outputs]
    rows.append((JobEvent, event))
    return update_with_rows(session, Job, where or {"id": row["id"]}, changes, rows, notify=notify)
