"""Per-job order without long holds, against real PostgreSQL and a real receiver: a failing event
holds the job's later events for at most one retry interval, a receiver that comes back gets every
pending event of the job at the next attempt, in order, and no event is given up before its own
retry schedule ends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from inference_server.db import Job
from inference_server.db.base import utcnow
from tests.support.receiver import Received, Receiver
from tests.support.seed import add_event, add_job, add_tenant, make_settings
from tests.support.waiting import wait_for
from webhooks.chain import sweep
from webhooks.dispatcher import Dispatcher
from webhooks.fanout import fan_out
from webhooks.tables import WebhookDelivery


@dataclass
class Answer:
    event_id: str
    type: str
    status: int
    at: float


class Switchable:
    """A receiver's behaviour: ``reject(request)`` decides a failure status (or None: 200); every
    answer is logged in the order the receiver gave it."""

    def __init__(self, stall: float = 0.0) -> None:
        self.stall = stall  # while down, answer this late (past the dispatcher's timeout)
        self.up = threading.Event()
        self.answers: list[Answer] = []
        self._lock = threading.Lock()

    def reject(self, req: Received) -> int | None:
        return None if self.up.is_set() else 500

    def __call__(self, n: int, req: Received) -> tuple[int, dict[str, str], float]:
        status = self.reject(req) or 200
        with self._lock:
            self.answers.append(
                Answer(req.headers["webhook-id"], json.loads(req.body)["type"], status, time.monotonic())
            )
        return status, {}, self.stall if status != 200 else 0.0

    def delivered(self) -> list[str]:
        with self._lock:
            return [a.event_id for a in self.answers if a.status == 200]


@pytest.fixture
def running(scratch_db, scratch_db_url):  # type: ignore[no-untyped-def]
    """Start a dispatcher thread with the given retry delays; stopped and closed at the end."""
    started: list[tuple[Dispatcher, threading.Event, threading.Thread]] = []

    def start(delays: list[float], **overrides: object) -> Dispatcher:
        d = Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=delays, **overrides), scratch_db)
        stop = threading.Event()
        thread = threading.Thread(target=d.run, args=(stop,))
        thread.start()
        started.append((d, stop, thread))
        return d

    yield start
    for d, stop, thread in started:
        stop.set()
        thread.join()
        d.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def chain(scratch_db) -> list[WebhookDelivery]:  # type: ignore[no-untyped-def]
    with scratch_db() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.event_seq)))


def head_has(scratch_db, **fields: object) -> bool:  # type: ignore[no-untyped-def]
    """Whether the job's first delivery exists and has these field values."""
    rows = chain(scratch_db)
    return bool(rows) and all(getattr(rows[0], k) == v for k, v in fields.items())


def emit(scratch_db, job_id: str, kind: str) -> str:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        return add_event(s, s.get(Job, job_id), kind).id


def test_a_recovered_receiver_gets_every_event_in_order_within_one_interval(
    scratch_db, receiver, running
) -> None:  # type: ignore[no-untyped-def]
    behaviour = Switchable()
    receiver.behaviour = behaviour
    with scratch_db() as s, s.begin():
        job_id = add_job(s, add_tenant(s), receiver.url).id
    running([0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
    # The job lives its life while its receiver answers 500.
    queued = emit(scratch_db, job_id, "job.queued")
    time.sleep(0.3)
    started = emit(scratch_db, job_id, "job.started")
    progress = [emit(scratch_db, job_id, "job.progress") for _ in range(5)][-1]
    time.sleep(0.3)
    succeeded = emit(scratch_db, job_id, "job.succeeded")

    def paused_in_a_long_interval() -> bool:
        rows = chain(scratch_db)
        if not rows:
            return False
        head = rows[0]
        return (
            head.attempts >= 4
            and head.status == "pending"
            and not any(r.status == "sending" for r in rows)
            and head.next_attempt_at is not None
            and (head.next_attempt_at - utcnow()).total_seconds() > 0.4
        )

    assert wait_for(paused_in_a_long_interval, 15, what="the state this test expects")
    # Every event of the job was tried during the outage, not only the first one.
    assert {a.type for a in behaviour.answers} >= {"job.queued", "job.started", "job.succeeded"}
    [interval] = {r.next_attempt_at for r in chain(scratch_db) if r.status in ("pending", "waiting")}
    behaviour.up.set()
    recovered = time.monotonic()
    deadline = (interval - utcnow()).total_seconds() + 0.5  # the head's next attempt, and the rest
    assert wait_for(lambda: len(behaviour.delivered()) == 4, 10, what="the state this test expects")
    last = max(a.at for a in behaviour.answers if a.status == 200)
    assert last - recovered <= deadline, (last - recovered, deadline)
    # In order, once each; the superseded progress ticks were coalesced into the last one.
    assert behaviour.delivered() == [queued, started, progress, succeeded]
    assert wait_for(
        lambda: [r.status for r in chain(scratch_db)] == ["succeeded"] * 4,
        5,
        what="the state this test expects",
    )
    time.sleep(0.3)
    assert len(behaviour.delivered()) == 4


def test_an_event_the_receiver_keeps_rejecting_holds_the_others_one_interval(
    scratch_db, receiver, running
) -> None:  # type: ignore[no-untyped-def]
    behaviour = Switchable()
    behaviour.up.set()
    receiver.behaviour = behaviour
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        kinds = ("job.queued", "job.started", "job.progress", "job.succeeded")
        ids = [add_event(s, job, k).id for k in kinds]
    behaviour.reject = lambda req: 400 if req.headers["webhook-id"] == ids[0] else None  # type: ignore[method-assign]
    running([0.5] * 4)
    assert wait_for(lambda: len(behaviour.delivered()) == 3, 10, what="the state this test expects")
    first_failure = behaviour.answers[0]
    assert (first_failure.event_id, first_failure.status) == (ids[0], 400)
    terminal = next(a for a in behaviour.answers if a.event_id == ids[3])
    # Sent at job.queued's first retry (0.5 s, ±10 %), not after its five attempts (2 s).
    assert terminal.at - first_failure.at < 0.5 * 1.1 + 0.3, terminal.at - first_failure.at
    assert behaviour.delivered() == ids[1:]
    assert wait_for(lambda: head_has(scratch_db, status="exhausted"), 10, what="the state this test expects")
    rows = chain(scratch_db)
    assert rows[0].attempts == 5 and [r.status for r in rows[1:]] == ["succeeded"] * 3
    assert [a.event_id for a in behaviour.answers].count(ids[3]) == 1


def test_retry_after_pauses_the_whole_job(scratch_db, receiver, running) -> None:  # type: ignore[no-untyped-def]
    answers = [(500, {}), (503, {"Retry-After": "1"})]
    receiver.behaviour = lambda n, req: (*(answers[n] if n < len(answers) else (200, {})), 0.0)
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        ids = [add_event(s, job, k).id for k in ("job.queued", "job.started", "job.succeeded")]
    running([0.01] * 3)
    assert wait_for(lambda: len(receiver.requests) == 5, 10, what="the state this test expects")
    assert receiver.ids() == [ids[0], ids[0], ids[0], ids[1], ids[2]]
    # The receiver asked for a second: nothing of the job went out before it had passed.
    assert receiver.requests[2].at - receiver.requests[1].at >= 0.9


def test_no_event_is_given_up_before_its_own_schedule_ends(scratch_db, receiver, running) -> None:  # type: ignore[no-untyped-def]
    behaviour = Switchable()
    receiver.behaviour = behaviour
    with scratch_db() as s, s.begin():
        job_id = add_job(s, add_tenant(s), receiver.url).id
    running([0.2] * 3)
    emit(scratch_db, job_id, "job.queued")
    assert wait_for(lambda: head_has(scratch_db, attempts=3), 10, what="the state this test expects")
    succeeded = emit(scratch_db, job_id, "job.succeeded")  # joins the job late in job.queued's schedule
    assert wait_for(lambda: head_has(scratch_db, status="exhausted"), 10, what="the state this test expects")
    head, terminal = chain(scratch_db)
    assert terminal.status in ("pending", "waiting", "sending") and terminal.attempts < 4
    behaviour.up.set()
    assert wait_for(
        lambda: [r.status for r in chain(scratch_db)] == ["exhausted", "succeeded"],
        10,
        what="the state this test expects",
    )
    assert behaviour.delivered() == [succeeded]


def test_a_receiver_that_does_not_answer_gets_one_event_per_job_at_a_time(
    scratch_db, receiver, running
) -> None:  # type: ignore[no-untyped-def]
    behaviour = Switchable(stall=1.0)
    receiver.behaviour = behaviour
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        ids = [add_event(s, job, k).id for k in ("job.queued", "job.started", "job.succeeded")]
    running([0.3] * 8, webhook_timeout=0.3)
    assert wait_for(lambda: head_has(scratch_db, attempts=3), 15, what="the state this test expects")
    # Timeouts, not answers: trying the job's other events would only wait out more of them.
    assert {a.event_id for a in behaviour.answers} == {ids[0]}
    assert [r.attempts for r in chain(scratch_db)[1:]] == [0, 0]
    behaviour.up.set()
    assert wait_for(
        lambda: [r.status for r in chain(scratch_db)] == ["succeeded"] * 3,
        10,
        what="the state this test expects",
    )
    assert behaviour.delivered() == ids


def test_a_lost_cursor_is_repaired_by_the_sweep(scratch_db, receiver) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        for kind in ("job.queued", "job.started", "job.succeeded"):
            add_event(s, job, kind)
        fan_out(s)
    released = utcnow() + timedelta(seconds=30)
    with scratch_db() as s, s.begin():  # as if the head's result and a fan-out had crossed: no cursor left
        first = chain(scratch_db)[0]
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == first.id)
            .values(status="succeeded", next_attempt_at=None)
        )
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id != first.id)
            .values(next_attempt_at=released, updated_at=utcnow() - timedelta(hours=1))
        )
    with scratch_db() as s, s.begin():
        assert sweep(s, max_age=600) == 0  # the frequent sweep reads only recent rows
        assert sweep(s) == 1  # the full one finds it
    assert [(r.status, r.next_attempt_at) for r in chain(scratch_db)] == [
        ("succeeded", None),
        ("pending", released),  # due when it had been released for
        ("waiting", released),
    ]
