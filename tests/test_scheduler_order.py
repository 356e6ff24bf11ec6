"""The scheduler's decisions, in-process on a database of the test's own (PostgreSQL, and SQLite as
the embedded `up` mode runs it): what one relay pass publishes, in priority and fair-share order,
within the free worker slots and the tenants' concurrency limits; where queued jobs are placed.
The broker is kombu's in-memory one: what is decided here is the database's part."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Job, JobEvent, OutboxMessage, WorkerHeartbeat
from inference_server.db.base import utcnow
from inference_server.jobs.enums import Priority
from inference_server.publish.positions import band, worth_telling, worth_writing
from inference_server.publish.relay import Relay
from inference_server.publish.scheduler import SchedulerConfig
from inference_server.publish.topology import message_app
from tests.support.seed import add_tenant, make_settings

T0 = utcnow() - timedelta(minutes=10)


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[sessionmaker[Session]]:
    if request.param == "postgresql":
        yield request.getfixturevalue("scratch_db")
        return
    from inference_server.db import make_database, make_session_factory
    from inference_server.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    engine = make_database(url)
    yield make_session_factory(engine)
    engine.dispose()


def relay(db: sessionmaker[Session], **config: Any) -> Relay:
    return Relay(
        message_app(make_settings("sqlite://").broker_url),
        db,
        consumer_timeout_ms=60_000,
        schedule=SchedulerConfig(**{"headroom_per_slot": 0.0, **config}),
    )


def workers(session: Session, n: int, family: str = "sd15") -> None:
    for i in range(n):
        session.add(
            WorkerHeartbeat(
                name=f"w{i}", families=[family], queues=[f"jobs.{family}"], slots=1, busy=0, device="cpu"
            )
        )
    session.commit()


def jobs(
    session: Session, tenant: Any, n: int, *, priority: Priority = Priority.NORMAL, at: int = 0
) -> list[str]:
    """``n`` queued jobs of ``tenant``, created ``at`` seconds after T0 and on, with their messages."""
    ids = []
    for i in range(n):
        created = T0 + timedelta(seconds=at + i)
        job = Job(
            tenant_id=tenant.id,
            family="sd15",
            task="txt2img",
            params={"prompt": "x"},
            priority=priority.rank,
            created_at=created,
        )
        session.add(job)
        session.flush()
        session.add(OutboxMessage(job_id=job.id, queue="jobs.sd15", created_at=created))
        ids.append(job.id)
    session.commit()
    return ids


def published(session: Session) -> list[str]:
    """Job ids whose messages went out, pass by pass (within a pass, in the order they were queued)."""
    query = (
        select(OutboxMessage.job_id)
        .where(OutboxMessage.published_at.is_not(None))
        .order_by(OutboxMessage.published_at, OutboxMessage.id)
    )
    return list(session.scalars(query))


def start(session: Session, job_ids: list[str]) -> None:
    """Workers took these jobs: running now."""
    for job_id in job_ids:
        session.get(Job, job_id).status = "running"  # type: ignore[union-attr]
    session.commit()


def finish(session: Session, job_ids: list[str]) -> None:
    for job_id in job_ids:
        session.get(Job, job_id).status = "succeeded"  # type: ignore[union-attr]
    session.commit()


def test_budget_is_free_slots_plus_headroom() -> None:
    config = SchedulerConfig(headroom=1, headroom_per_slot=0.1, idle_window=2)
    assert config.budget(slots=4, in_flight=0) == 5
    assert config.budget(slots=4, in_flight=5) == 0
    assert config.budget(slots=100, in_flight=90) == 20  # headroom grows with the fleet
    assert config.budget(slots=0, in_flight=1) == 1  # nobody heard from: a small window


def test_only_free_slots_are_published_then_more_as_jobs_start(db: sessionmaker[Session]) -> None:
    with db() as s:
        tenant = add_tenant(s)
        ids = jobs(s, tenant, 10)
        workers(s, 2)
    r = relay(db, headroom=1)
    assert r.publish_pending() == 3  # two slots and one queued ahead
    assert r.publish_pending() == 0
    with db() as s:
        assert published(s) == ids[:3]
        start(s, ids[:2])
    assert r.publish_pending() == 0  # two run, one waits for the first slot to free
    with db() as s:
        finish(s, ids[:2])
    assert r.publish_pending() == 2  # two done: the job handed out takes a slot, two more follow
    with db() as s:
        assert published(s) == ids[:5]


def test_a_job_in_the_finisher_frees_its_slot_for_the_next(db: sessionmaker[Session]) -> None:
    """A running job whose last step is recorded is being finished beside the next one: it still
    runs in the database, but the next job's message must go out, or the worker waits for it."""
    with db() as s:
        ids = jobs(s, add_tenant(s), 6)
        workers(s, 1)
    r = relay(db, headroom=1)
    assert r.publish_pending() == 2
    with db() as s:
        start(s, ids[:1])
        job = s.get(Job, ids[0])
        job.progress_step, job.progress_total = 3, 6  # type: ignore[union-attr]
        s.commit()
    assert r.publish_pending() == 0  # still denoising: its slot is taken, one waits behind it
    with db() as s:
        s.get(Job, ids[0]).progress_step = 6  # type: ignore[union-attr]
        s.commit()
    assert r.publish_pending() == 1  # denoised, in the finisher: one more behind the next
    with db() as s:
        assert published(s) == ids[:3]
        assert s.get(Job, ids[0]).status == "running"  # type: ignore[union-attr]


def test_a_slot_freeing_wakes_a_relay_that_published_in_its_last_pass(
    scratch_db: sessionmaker[Session],
) -> None:
    """A relay whose last pass published waits for a submit; a worker's ``job_slots`` notice must
    wake it too, or the next message waits for the relay's interval while the worker asks for it
    (the relay's interval is made far longer than the test's wait)."""
    import threading
    import time

    from inference_server.events import notify_slot_freed

    with scratch_db() as s:
        ids = jobs(s, add_tenant(s), 6)
        workers(s, 1)
    r = relay(scratch_db, headroom=1)
    r.interval = 60.0
    stop = threading.Event()
    thread = r.start(stop)
    try:
        deadline = time.monotonic() + 20
        while r.published < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.published == 2 and not r.saturated
        time.sleep(1.0)  # the relay waits now, and its slot listener listens
        with scratch_db() as s:
            start(s, ids[:1])
            job = s.get(Job, ids[0])
            job.progress_step, job.progress_total = 6, 6  # type: ignore[union-attr]
            notify_slot_freed(s, ids[0])
            s.commit()
        deadline = time.monotonic() + 20
        while r.published < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.published == 3
    finally:
        stop.set()
        r.wake.set()
        r.freed.set()
        thread.join(timeout=10)


def test_no_worker_heard_from_still_publishes_a_small_window(db: sessionmaker[Session]) -> None:
    with db() as s:
        jobs(s, add_tenant(s), 5)
    assert relay(db, idle_window=2).publish_pending() == 2


def test_high_priority_goes_first_then_normal_then_low(db: sessionmaker[Session]) -> None:
    with db() as s:
        tenant = add_tenant(s)
        low = jobs(s, tenant, 2, priority=Priority.LOW)
        normal = jobs(s, tenant, 20, at=10)
        high = jobs(s, tenant, 1, priority=Priority.HIGH, at=100)
        workers(s, 1)
    r = relay(db, headroom=0)
    assert r.publish_pending() == 1
    with db() as s:
        assert published(s) == high
        start(s, high)
    assert r.publish_pending() == 0
    with db() as s:
        finish(s, high)
    assert r.publish_pending() == 1
    with db() as s:
        assert set(published(s)) == {*high, normal[0]}
        assert low[0] not in published(s)


def test_one_job_of_another_tenant_waits_behind_one_job_of_each(db: sessionmaker[Session]) -> None:
    with db() as s:
        a, b, c = add_tenant(s), add_tenant(s), add_tenant(s)
        a_ids = jobs(s, a, 40)
        c_ids = jobs(s, c, 3, at=50)
        b_ids = jobs(s, b, 1, at=60)  # the newest job of all
        workers(s, 2)
    relay(db, headroom=1).publish_pending()
    with db() as s:
        # Round 1: each tenant's first job, oldest first; then round 2.
        assert published(s) == [a_ids[0], c_ids[0], b_ids[0]]


def test_a_slot_freed_with_nothing_in_flight_goes_to_the_tenant_served_longest_ago(
    db: sessionmaker[Session],
) -> None:
    """No headroom: each slot is handed out as it frees, when no tenant has anything in flight, so
    every backlog's next job is in round 1. Age alone would serve A's backlog to its end."""
    with db() as s:
        a, b = add_tenant(s), add_tenant(s)
        a_ids = jobs(s, a, 10)
        workers(s, 1)
    r = relay(db, headroom=0)
    for served in a_ids[:2]:
        assert r.publish_pending() == 1
        with db() as s:
            start(s, [served])
            finish(s, [served])
    with db() as s:
        b_ids = jobs(s, b, 2, at=30)
    order = []
    for _ in range(4):
        r.publish_pending()
        with db() as s:
            order.append(published(s)[-1])
            start(s, order[-1:])
            finish(s, order[-1:])
    assert order == [b_ids[0], a_ids[2], b_ids[1], a_ids[3]]


def test_a_tenant_running_jobs_yields_the_next_slot(db: sessionmaker[Session]) -> None:
    with db() as s:
        a, b = add_tenant(s), add_tenant(s)
        a_ids = jobs(s, a, 10)
        workers(s, 3)
        start(s, a_ids[:3])  # A holds every slot
        for job_id in a_ids[:3]:
            s.execute(
                OutboxMessage.__table__.update()
                .where(OutboxMessage.job_id == job_id)
                .values(published_at=utcnow())
            )
        s.commit()
        b_ids = jobs(s, b, 2, at=30)
    relay(db, headroom=2).publish_pending()
    with db() as s:
        # A's 4th job is its round 4 (3 running + 1), B's first two are rounds 1 and 2.
        assert published(s)[3:] == [b_ids[0], b_ids[1]]


def test_a_tenant_at_its_limit_is_skipped_without_blocking_others(db: sessionmaker[Session]) -> None:
    with db() as s:
        a, b = add_tenant(s, max_concurrent=1), add_tenant(s)
        a_ids = jobs(s, a, 5)
        b_ids = jobs(s, b, 5, at=20)
        workers(s, 4)
    r = relay(db, headroom=0)
    assert r.publish_pending() == 4
    with db() as s:
        assert published(s) == [a_ids[0], *b_ids[:3]]
        start(s, [a_ids[0], b_ids[0]])
        finish(s, [b_ids[0]])
    assert r.publish_pending() == 1
    with db() as s:
        assert published(s)[-1] == b_ids[3]  # A still runs one: its next job waits
        finish(s, [a_ids[0]])
    assert r.publish_pending() == 1
    with db() as s:
        assert published(s)[-1] == a_ids[1]


def test_a_canceled_waiting_job_is_never_published(db: sessionmaker[Session]) -> None:
    with db() as s:
        ids = jobs(s, add_tenant(s), 3)
        workers(s, 1)
        s.get(Job, ids[0]).status = "canceled"  # type: ignore[union-attr]
        s.commit()
    r = relay(db, headroom=0)
    assert r.publish_pending() == 1
    with db() as s:
        assert published(s) == [ids[1]]
    r.update_positions()
    with db() as s:
        unpublished = select(OutboxMessage.job_id).where(OutboxMessage.published_at.is_(None))
        assert list(s.scalars(unpublished)) == [ids[2]]  # the canceled job's is stamped, not sent
    assert r.published == 1


def test_positions_follow_the_scheduler_order_with_an_event_per_material_change(
    db: sessionmaker[Session],
) -> None:
    with db() as s:
        a, b = add_tenant(s, max_priority="high"), add_tenant(s)
        a_ids = jobs(s, a, 30)
        b_ids = jobs(s, b, 1, at=40)
        workers(s, 1)
    r = relay(db, headroom=1)
    r.publish_pending()  # A's first two handed out
    r.update_positions()
    with db() as s:
        place = dict(s.execute(select(Job.id, Job.queue_position)).all())
        # Handed out: A's first and B's (round 1); then A's others, one round each.
        assert [place[j] for j in a_ids[:3]] == [0, 2, 3] and place[b_ids[0]] == 1
        assert place[a_ids[-1]] == 30
        queued_events = s.scalar(select(func.count()).where(JobEvent.type == "job.queued"))
        assert queued_events == 30  # every job but the first, which is next: it is told when it starts
    with db() as s:
        high = jobs(s, a, 1, priority=Priority.HIGH, at=100)[0]
    r.update_positions()
    with db() as s:
        place = dict(s.execute(select(Job.id, Job.queue_position)).all())
        assert place[high] == 2 and place[a_ids[1]] == 3 and place[b_ids[0]] == 1
        # Everyone behind moved by one: news only for those crossing 5, 10 and 20 (4, 9 and 19).
        events = s.scalar(select(func.count()).where(JobEvent.type == "job.queued"))
        assert events == 30 + 1 + 3


def test_places_are_stored_often_and_told_at_thresholds() -> None:
    assert worth_writing(None, 0) and worth_writing(99, 98) and not worth_writing(7, 7)
    assert not worth_writing(4000, 3700) and worth_writing(4000, 3600)
    assert [band(p) for p in (0, 1, 3, 7, 10, 19, 20, 49, 50, 120, 4000)] == [
        0,
        1,
        2,
        5,
        10,
        10,
        20,
        20,
        50,
        100,
        2000,
    ]
    assert worth_telling(None, 3) and not worth_telling(None, 0)  # next in line: job.started follows
    assert worth_telling(5, 4) and not worth_telling(4, 3) and worth_telling(1, 0)
    assert not worth_telling(400, 201) and worth_telling(400, 199) and worth_telling(400, 500)
