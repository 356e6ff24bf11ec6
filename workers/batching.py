"""Cross-request batching on the worker: when this worker claims a job its model batches, it also
claims compatible queued jobs straight from the database, and runs them all in one pipeline call.

The database decides what runs, so it also decides what runs together: the other members are
queued jobs with the job's batch key (``jobs.batch_key``), oldest first, taken ``FOR UPDATE SKIP
LOCKED`` (two workers never take the same job, and neither waits for the other) and claimed through
the same ``transitions.claim`` as a delivered job: each member gets its own attempt, lease,
``job.started`` event and side thread (progress, lease renewal, cancellation). Their queue
messages, delivered later, find the job running or finished and are refused like any duplicate
(``ClaimRefusal.OWNED`` / ``FINISHED``); messages not yet published are deleted with the claims,
so they cost no delivery at all. A worker that dies with a batch in flight leaves every
member with a lease that expires: the reconciler queues each again, like any job.

A batch fills up to the model's ``max_batch`` images, waiting for jobs to arrive until its lead has
been queued ``batch_wait_ms``: a lone job starts that much later, never more. Its members hold one
worker slot together (publish/scheduler.py), and are finished together (workers/finisher.py). A
failed batch call runs its members again one by one before any of them fails, so one member that
the batched call cannot take fails alone."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from PIL import Image
from sqlalchemy import delete, select, tuple_, update

from inference_server.db import Job, OutboxMessage
from inference_server.db.base import utcnow
from inference_server.errors import JobCanceled
from inference_server.events import notify_slot_freed
from inference_server.jobs import transitions
from inference_server.jobs.batch_key import batch_key
from inference_server.jobs.enums import ClaimRefusal, JobStatus, RunOutcome
from inference_server.jobs.transitions import Claim
from inference_server.registry import BatchPolicy, Registry
from workers.metrics import BATCH_JOBS, BATCH_RETRIED

if TYPE_CHECKING:
    from workers.ahead import Prepared
    from workers.finisher import FinishedRun
    from workers.progress import ProgressWatcher
    from workers.runner import JobRunner

log = logging.getLogger(__name__)

JOBS = Job.__table__
OUTBOX = OutboxMessage.__table__
# The order queued jobs join a batch in: the scheduler's priority first, then age (fair share between
# tenants is the scheduler's; members of a batch share one call, so they hold one slot together).
QUEUE_ORDER = (JOBS.c.priority.desc(), JOBS.c.created_at, JOBS.c.id)
# Ahead of that order, jobs whose message is still unsent: the scheduler's headroom message (out
# already) then stays for the worker's next delivery, where it leads the next batch, instead of
# reaching the worker for a job this batch took and costing it a delivery its claim refuses.
UNSENT_FIRST = (
    select(OUTBOX.c.id).where(OUTBOX.c.job_id == JOBS.c.id, OUTBOX.c.published_at.is_(None)).exists().desc()
)
POLL_SECONDS = 0.005  # between looks for more jobs while a batch waits to fill

Member = tuple[Claim, Future[None]]  # a claim and its recording (done for gathered members)
Produced = tuple[list[Image.Image], "ProgressWatcher"]  # a member's images and running watcher


def largest_batch(registry: Registry) -> int:
    """The most jobs one batch of ``registry`` can hold (database connections a worker may need)."""
    return max((f.batching(m.id).max_batch for f in registry.families.values() for m in f.models), default=1)


class Batcher:
    """Finds and claims the other members of a batch for a job a worker has claimed."""

    def __init__(self, runner: JobRunner, registry: Registry | None = None) -> None:
        """``registry``: the one to follow; by default the runner's engine's, read at each claim
        (the runtime registry replaces it)."""
        self.runner = runner
        self.registry = registry

    def policy(self, claim: Claim) -> BatchPolicy | None:
        """The batching policy for ``claim``'s job, or None when it runs alone."""
        registry = self.registry if self.registry is not None else self.runner.engine.registry
        family = registry.families.get(claim.family)
        if family is None:
            return None
        policy = family.batching(claim.spec.model)
        spec = claim.spec
        return policy if policy.admits(spec.width, spec.height, len(spec.seeds)) else None

    def gather(self, lead: Claim, recorded: Future[None]) -> list[Member]:
        """Claim queued jobs that can share ``lead``'s call, up to the policy's ``max_batch``
        images, waiting for them until ``lead`` has been queued ``batch_wait_ms``; return them
        claimed and recorded (no member: ``lead`` runs alone). The batch is stamped on every member's row."""
        policy = self.policy(lead)
        key = batch_key(lead.spec) if policy is not None else None
        if policy is None or key is None:
            return []
        room = policy.max_batch - len(lead.spec.seeds)
        deadline = time.monotonic() + _wait_left(lead, policy)
        members: list[Claim] = []
        while True:
            taken = {lead.job_id, *(m.job_id for m in members)}
            try:
                got = self._claim_some(key, room, taken, policy)
            except Exception as exc:  # the lead runs anyway; what was claimed so far stays claimed
                log.warning("looking for jobs to batch with %s failed: %s", lead.job_id, exc)
                break
            members += got
            room -= sum(len(c.spec.seeds) for c in got)
            left = deadline - time.monotonic()
            if room <= 0 or left <= 0:
                break
            time.sleep(min(POLL_SECONDS, left))
        if not members:
            return []
        self._stamp(lead, recorded, members)
        done: Future[None] = Future()
        done.set_result(None)
        return [(m, done) for m in members]

    def _claim_some(self, key: str, room: int, taken: set[str], policy: BatchPolicy) -> list[Claim]:
        """One look: claim (and commit) queued jobs of ``key`` holding at most ``room`` images."""
        s = self.runner.settings
        with self.runner.sf() as session:
            ids = session.scalars(
                select(JOBS.c.id)
                .where(
                    JOBS.c.batch_key == key,
                    JOBS.c.status == JobStatus.QUEUED.value,
                    JOBS.c.attempts < s.job_max_attempts,
                    JOBS.c.id.not_in(taken),
                )
                .order_by(UNSENT_FIRST, *QUEUE_ORDER)
                .limit(room)
                .with_for_update(skip_locked=True)
            ).all()
            publishing = _being_published(session, list(ids))
            claims: list[Claim] = []
            for job_id in ids:
                if job_id in publishing:
                    continue  # its message goes out now: it leads a batch of its own when delivered
                claim = transitions.claim(
                    session,
                    job_id,
                    max_attempts=s.job_max_attempts,
                    lease_seconds=s.job_lease_seconds,
                    worker=self.runner.worker_name,
                )
                if claim in (ClaimRefusal.EXHAUSTED, ClaimRefusal.INVALID):
                    return []  # that refusal committed, releasing the locks of the claims before it
                if isinstance(claim, ClaimRefusal):
                    continue
                images = len(claim.spec.seeds)
                if images <= room and policy.admits(claim.spec.width, claim.spec.height, images):
                    claims.append(claim)
                    room -= images
            if claims:
                _drop_unsent_messages(session, [c.job_id for c in claims])
                transitions.record_claims(session, claims)
            return claims

    def _stamp(self, lead: Claim, recorded: Future[None], members: list[Claim]) -> None:
        """Record the batch on every member (GET shows it; their end events carry it)."""
        batch = {"batch_id": str(uuid.uuid4()), "batch_size": len(members) + 1}
        everyone = [lead, *members]
        with contextlib.suppress(Exception):
            recorded.result()  # the lead's row is written (or its run fails on that anyway)
        for claim in everyone:  # after: the lead's claim was written from its row
            claim.row.update(batch)
        try:
            with self.runner.sf() as session:
                attempts = [(claim.job_id, claim.attempt) for claim in everyone]
                owned = (tuple_(Job.id, Job.attempts).in_(attempts), Job.status == JobStatus.RUNNING)
                session.execute(update(Job).where(*owned).values(**batch))
                # The batch holds one slot from now on (publish/scheduler.py): the relays may send
                # this slot's next message while it denoises.
                notify_slot_freed(session, lead.job_id)
                session.commit()
        except Exception as exc:  # a side record: the batch runs without it
            log.warning("recording batch %s failed: %s", batch["batch_id"], exc)
        BATCH_JOBS.observe(len(everyone))
        log.info("batch %s: %s", batch["batch_id"], ", ".join(c.job_id for c in everyone))


def _wait_left(lead: Claim, policy: BatchPolicy) -> float:
    """How long ``lead`` may still wait for members: ``batch_wait_ms`` from its submit, since
    whatever could join it while it was queued is queued already. (The API's clock wrote its
    ``created_at``: a skew between hosts shortens or lengthens this, never past the policy's.)"""
    created = lead.row.get("created_at")
    queued = (utcnow() - created).total_seconds() if created is not None else 0.0
    return max(0.0, policy.batch_wait_ms / 1000 - max(0.0, queued))


def _being_published(session: Any, job_ids: list[str]) -> set[str]:
    """Those of ``job_ids`` whose unsent message a relay is publishing right now (it holds the
    row's lock: publish/scheduler.lock_chosen); the others' unsent messages are locked here, for
    ``_drop_unsent_messages`` to delete with their claims."""
    if not job_ids or session.get_bind().dialect.name != "postgresql":
        return set()
    unsent = (OUTBOX.c.job_id.in_(job_ids), OUTBOX.c.published_at.is_(None))
    rows = session.execute(select(OUTBOX.c.id, OUTBOX.c.job_id).where(*unsent))
    every = {row.id: row.job_id for row in rows}
    mine = set(session.scalars(select(OUTBOX.c.id).where(*unsent).with_for_update(skip_locked=True)))
    return {job_id for message, job_id in every.items() if message not in mine}


def _drop_unsent_messages(session: Any, job_ids: list[str]) -> None:
    """Delete the not yet published queue messages of jobs claimed here, in their claims'
    transaction: such a job needs no message any more (a release or the reconciler writes a new
    one if it must run again), and each message published would cost a worker a delivery that
    its claim refuses. One the relay is publishing right now (locked) is left to be refused."""
    unsent = (
        select(OUTBOX.c.id)
        .where(OUTBOX.c.published_at.is_(None), OUTBOX.c.job_id.in_(job_ids))
        .with_for_update(skip_locked=True)
    )
    session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(unsent.scalar_subquery())))


def run_batch(
    runner: JobRunner, members: list[Member], queue: str, started: float, *, lead: Prepared | None = None
) -> list[RunOutcome | FinishedRun | Exception]:
    """Run ``members`` (claimed and compatible) in one pipeline call; return, in order, each
    one's denoised run for the runner to finish as a job of its own, or how it ended, or the
    ClaimUnavailable its run raised (only the first member's claim can still be unwritten): the
    others go on either way, so none is left holding a lease its run no longer renews. ``lead``:
    the first member's request and watcher, made ahead (workers/ahead.py)."""
    from workers.runner import ClaimUnavailable

    produced = _generate_together(runner, members, lead)
    runs: list[RunOutcome | FinishedRun | Exception] = []
    for (claim, recorded), produce in zip(members, produced, strict=True):
        try:
            runs.append(runner._run_claimed(claim, recorded, queue, started, produce))
        except ClaimUnavailable as exc:
            runs.append(exc)
    return runs


def _generate_together(
    runner: JobRunner, members: list[Member], lead: Prepared | None = None
) -> list[Callable[[], Produced]]:
    """Each member's share of one call, as a callable that returns it (images and the member's
    watcher, still running) or raises its member's end (a canceled member's images are dropped;
    an input that cannot be read fails that member alone)."""
    shares: list[Callable[[], Produced]] = [_raising(None)] * len(members)
    ready: list[int] = []
    requests: list[Any] = []
    for i, (claim, _) in enumerate(members):
        try:
            requests.append(lead.engine_request() if i == 0 and lead is not None else runner._request(claim))
            ready.append(i)
        except Exception as exc:
            shares[i] = _raising(exc)

    def watch(i: int) -> ProgressWatcher:
        if i == 0 and lead is not None:
            return lead.watcher  # started ahead
        return runner._watcher(*members[i]).start()

    watchers = [watch(i) for i in ready]
    # Every member sees every step: the first one's callback also tells the gate as the call nears its end.
    callbacks: list[Callable[[int, int], bool]] = [w.on_step for w in watchers]
    if watchers:
        callbacks[0] = runner._step_callback(watchers[0], members[0][0], alone=False)
    try:
        images = runner.engine.generate_batch(requests, callbacks)
    except JobCanceled:  # every member left
        images = None
    except Exception as exc:
        log.warning("batch of %d jobs failed (%s); running each alone", len(ready), type(exc).__name__)
        BATCH_RETRIED.inc()
        for i, request, watcher in zip(ready, requests, watchers, strict=True):
            shares[i] = _alone(runner, watcher, request)
        return shares
    if images is not None:
        runner._observe_lora_switch(members[ready[0]][0])
    announced = False  # one member tells the scheduler the call is over: their slot is free
    for n, (i, watcher) in enumerate(zip(ready, watchers, strict=True)):
        mine = images[n] if images is not None else None
        try:
            got = runner._watched(watcher, functools.partial(_or_canceled, mine), announce=not announced)
            announced = True
            shares[i] = _returning((got, watcher))
        except Exception as exc:
            shares[i] = _raising(exc)
    return shares


def _alone(runner: JobRunner, watcher: ProgressWatcher, request: Any) -> Callable[[], Produced]:
    """A member run on its own after its batch failed, under its batch's watcher."""
    try:
        got = runner._watched(watcher, lambda: runner.engine.generate(request, on_step=watcher.on_step))
        return _returning((got, watcher))
    except Exception as exc:
        return _raising(exc)


def _or_canceled(images: list[Image.Image] | None) -> list[Image.Image]:
    if images is None:
        raise JobCanceled("every job of the batch was canceled")
    return images


def _returning(value: Produced) -> Callable[[], Produced]:
    return lambda: value


def _raising(exc: Exception | None) -> Callable[[], Produced]:
    def produce() -> Produced:
        raise exc if exc is not None else RuntimeError("no share of the batch")

    return produce
