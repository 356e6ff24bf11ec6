"""How a worker gathers a batch (workers.batching.Batcher) on PostgreSQL: compatible queued jobs
only, oldest first, up to max_batch images, each claimed with its own attempt, lease and
job.started event; two workers gathering at once never take the same job (SKIP LOCKED)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import func, select, update

from inference_server.db import Job, JobEvent, JobOutput, OutboxMessage
from inference_server.db.base import utcnow
from inference_server.jobs import transitions
from inference_server.jobs.batch_key import batch_key
from inference_server.jobs.spec import JobSpec
from inference_server.registry import parse_registry
from tests.support.seed import add_tenant, make_settings
from workers.batching import Batcher

REGISTRY = parse_registry(
    {
        "families": {
            "sd15": {
                "tasks": ["txt2img"],
                "max_batch": 4,
                "batch_wait_ms": 0,
                "models": [{"id": "m", "source": "x"}],
            }
        }
    }
)


def spec(**changes: Any) -> JobSpec:
    values = {"family": "sd15", "model": "m", "task": "txt2img", "width": 64, "height": 64, "steps": 4}
    return JobSpec.model_validate({**values, "seeds": [1], **changes})


def add_jobs(
    session_factory: Any, specs: list[JobSpec], *, ago: timedelta = timedelta(minutes=5)
) -> list[str]:
    start = utcnow() - ago
    with session_factory() as session:
        tenant = add_tenant(session)
        jobs = [
            Job(
                tenant_id=tenant.id,
                family=s.family,
                model=s.model,
                task=s.task.value,
                params=s.stored(),
                batch_key=batch_key(s),
                progress_total=s.steps,
                created_at=start + timedelta(seconds=i),
            )
            for i, s in enumerate(specs)
        ]
        session.add_all(jobs)
        session.commit()
        return [j.id for j in jobs]


def lead_claim(session_factory: Any, settings: Any, job_id: str) -> transitions.Claim:
    with session_factory() as session:
        claim = transitions.claim(session, job_id, max_attempts=3, lease_seconds=30, worker="w")
        assert isinstance(claim, transitions.Claim)
        transitions.record_claim(session, claim)
    return claim


def batcher(session_factory: Any, settings: Any, name: str) -> Batcher:
    runner = SimpleNamespace(settings=settings, sf=session_factory, worker_name=name)
    return Batcher(runner, REGISTRY)  # type: ignore[arg-type]


def done() -> Any:
    from concurrent.futures import Future

    f: Future[None] = Future()
    f.set_result(None)
    return f


def test_a_batch_takes_compatible_jobs_unsent_first_then_oldest(scratch_db, scratch_db_url):
    settings = make_settings(scratch_db_url)
    ids = add_jobs(
        scratch_db,
        [
            spec(prompt="lead"),
            spec(steps=5),  # another key
            spec(prompt="b", seeds=[2, 3]),  # its message is out: left to lead the next batch
            spec(prompt="c", seeds=[4, 5]),
            spec(prompt="d"),
            spec(prompt="e"),  # would make 5 images: left for later
            spec(prompt="f", seeds=[6]),
        ],
    )
    with scratch_db() as session:  # queue messages: the relay has published b's and f's
        for i, job_id in enumerate(ids):
            sent = utcnow() if i in (2, 6) else None
            session.add(OutboxMessage(job_id=job_id, queue="jobs.sd15", published_at=sent))
        session.commit()
    lead = lead_claim(scratch_db, settings, ids[0])
    members = batcher(scratch_db, settings, "w1").gather(lead, done())
    assert [m.job_id for m, _ in members] == [ids[3], ids[4]]
    with scratch_db() as session:
        messages = set(session.scalars(select(OutboxMessage.job_id)))
    # A member's unsent message is gone with its claim (no delivery for its claim to refuse); the
    # sent ones stay, and so do the messages of every job not taken.
    assert messages == set(ids) - {ids[3], ids[4]}
    with scratch_db() as session:
        rows = {j.id: j for j in session.scalars(select(Job))}
        started = set(session.scalars(select(JobEvent.job_id).where(JobEvent.type == "job.started")))
    for job_id in (ids[0], ids[3], ids[4]):
        job = rows[job_id]
        assert job.status == "running" and job.attempts == 1 and job.lease_expires_at is not None
        assert job.batch_id == rows[ids[0]].batch_id and job.batch_size == 3
        assert job_id in started
    assert rows[ids[0]].batch_id is not None
    left = (ids[1], ids[2], ids[5], ids[6])
    assert all(rows[i].status == "queued" and rows[i].batch_id is None for i in left)
    # With no unsent job left, sent ones join, oldest first (their deliveries are then refused).
    lead = lead_claim(scratch_db, settings, ids[5])
    members = batcher(scratch_db, settings, "w1").gather(lead, done())
    assert [m.job_id for m, _ in members] == [ids[2], ids[6]]


def test_two_workers_gathering_at_once_never_share_a_job(scratch_db, scratch_db_url):
    settings = make_settings(scratch_db_url)
    ids = add_jobs(scratch_db, [spec(prompt=str(i), seeds=[i]) for i in range(10)])
    leads = [lead_claim(scratch_db, settings, ids[0]), lead_claim(scratch_db, settings, ids[1])]
    got: dict[int, list[str]] = {}
    barrier = threading.Barrier(2)

    def gather(n: int) -> None:
        barrier.wait()
        members = batcher(scratch_db, settings, f"w{n}").gather(leads[n], done())
        got[n] = [m.job_id for m, _ in members]

    threads = [threading.Thread(target=gather, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got[0]) == len(got[1]) == 3
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) <= set(ids[2:])
    with scratch_db() as session:
        running = session.scalars(select(Job.id).where(Job.status == "running")).all()
    assert len(running) == 8


def test_a_lone_job_waits_no_longer_than_batch_wait_ms_from_its_submit(scratch_db, scratch_db_url):
    settings = make_settings(scratch_db_url)
    waiting = parse_registry(
        {
            "families": {
                "sd15": {
                    "tasks": ["txt2img"],
                    "max_batch": 4,
                    "batch_wait_ms": 400,
                    "models": [{"id": "m", "source": "x"}],
                }
            }
        }
    )
    runner = SimpleNamespace(settings=settings, sf=scratch_db, worker_name="w")
    [fresh] = add_jobs(scratch_db, [spec()], ago=timedelta(0))
    lead = lead_claim(scratch_db, settings, fresh)
    t = time.monotonic()
    assert Batcher(runner, waiting).gather(lead, done()) == []  # type: ignore[arg-type]
    assert 0.2 <= time.monotonic() - t <= 0.4 + 2  # waited for company, then gave up (no hang)

    # Queued longer than batch_wait_ms already: whatever could join it is queued, so no wait.
    [old] = add_jobs(scratch_db, [spec(seeds=[2])], ago=timedelta(seconds=5))
    lead = lead_claim(scratch_db, settings, old)
    t = time.monotonic()
    assert Batcher(runner, waiting).gather(lead, done()) == []  # type: ignore[arg-type]
    assert time.monotonic() - t < 0.2


def test_a_batch_holds_one_slot_and_its_members_succeed_together_each_on_its_own_terms(
    scratch_db, scratch_db_url
):
    from inference_server.publish import scheduler

    settings = make_settings(scratch_db_url)
    lone, *ids = add_jobs(scratch_db, [spec(steps=5), spec(prompt="a"), spec(prompt="b"), spec(prompt="c")])
    lead_claim(scratch_db, settings, lone)
    lead = lead_claim(scratch_db, settings, ids[0])
    members = [m for m, _ in batcher(scratch_db, settings, "w1").gather(lead, done())]
    assert [m.job_id for m in members] == ids[1:]
    with scratch_db() as session:
        # Four jobs running, two pipeline calls: the relay's budget counts two slots taken.
        assert session.scalar(select(func.count()).select_from(Job).where(Job.status == "running")) == 4
        assert scheduler.in_flight(session) == {"sd15": 2}
        # The batch's call ends: its slot is free once one member's last step is written.
        session.execute(update(Job).where(Job.id == ids[2]).values(progress_step=4))
        session.commit()
        assert scheduler.in_flight(session) == {"sd15": 1}
        # One member is canceled while the batch is finished.
        session.execute(update(Job).where(Job.id == ids[1]).values(status="canceled"))
        session.commit()

    def row(claim: transitions.Claim) -> dict[str, Any]:
        stored = {"uri": f"s3://b/{claim.job_id}", "sha256": "0" * 64, "size_bytes": 1}
        stored["content_type"] = "image/png"
        return {"job_id": claim.job_id, "index": 0, "width": 64, "height": 64, "seed": 1, **stored}

    everyone = [lead, *members]
    with scratch_db() as session:
        written = transitions.succeed_all(session, [(c, [row(c)], 4) for c in everyone])
    assert written == [True, False, True]
    with scratch_db() as session:
        rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        outputs = set(session.scalars(select(JobOutput.job_id)))
        ended = session.scalars(select(JobEvent.job_id).where(JobEvent.type == "job.succeeded")).all()
    assert [rows[i].status for i in ids] == ["succeeded", "canceled", "succeeded"]
    assert outputs == set(ended) == {ids[0], ids[2]}
    assert rows[ids[0]].progress_step == rows[ids[0]].progress_total == 4


def test_a_batch_put_back_in_its_queue_holds_a_slot_per_job_once_published(scratch_db, scratch_db_url):
    """The batch's worker is lost and its members are queued again (the reconciler, a storage
    failure, a claim ahead given back): they are separate jobs again, each its own message, and the
    relay's budget counts each once published, not the old batch as one."""
    from inference_server.publish import scheduler

    settings = make_settings(scratch_db_url)
    ids = add_jobs(scratch_db, [spec(prompt="a"), spec(prompt="b"), spec(prompt="c")])
    lead = lead_claim(scratch_db, settings, ids[0])
    members = [m for m, _ in batcher(scratch_db, settings, "w1").gather(lead, done())]
    assert len(members) == 2
    with scratch_db() as session:
        for job_id in ids:
            row = session.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one()
            assert row["batch_id"] is not None
            assert transitions.requeue(session, dict(row), queue="sd15")
        session.commit()
        session.execute(update(OutboxMessage).values(published_at=utcnow()))
        session.commit()
        assert scheduler.in_flight(session) == {"sd15": 3}


def test_a_job_whose_message_a_relay_is_publishing_is_not_taken_into_a_batch_nor_the_reverse(
    scratch_db, scratch_db_url
):
    from inference_server.publish import scheduler

    settings = make_settings(scratch_db_url)
    ids = add_jobs(scratch_db, [spec(prompt="lead"), spec(prompt="a"), spec(prompt="b"), spec(prompt="c")])
    with scratch_db() as session:
        session.add_all([OutboxMessage(job_id=job_id, queue="jobs.sd15") for job_id in ids])
        session.commit()
        messages = {r.job_id: r.id for r in session.execute(select(OutboxMessage.job_id, OutboxMessage.id))}
    relay = scratch_db()
    try:  # a relay's pass holds "a"'s message: chosen, locked, being published
        chosen = [SimpleNamespace(id=messages[ids[1]], job_id=ids[1])]
        assert scheduler.lock_chosen(relay, chosen) == chosen
        lead = lead_claim(scratch_db, settings, ids[0])
        members = batcher(scratch_db, settings, "w1").gather(lead, done())
        assert [m.job_id for m, _ in members] == [ids[2], ids[3]]  # "a" is left to its delivery
        with scratch_db() as session:
            assert session.get(Job, ids[1]).status == "queued"
    finally:
        relay.rollback()
        relay.close()

    # The other way round: a batch gathering holds "a"'s message; the relay publishes without it.
    gathering = scratch_db()
    try:
        gathering.scalars(
            select(OutboxMessage.id).where(OutboxMessage.job_id == ids[1]).with_for_update()
        ).all()
        with scratch_db() as session:
            assert scheduler.lock_chosen(session, chosen) == []
    finally:
        gathering.rollback()
        gathering.close()
