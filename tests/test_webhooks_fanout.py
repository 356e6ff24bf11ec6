"""Fan-out rules against real PostgreSQL: progress coalescing, event filters, tenant defaults,
per-job order behind a failing delivery, lease takeover, and the embedded SQLite mode."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import select, update

from inference_server.db import make_database, make_session_factory
from inference_server.db.base import utcnow
from inference_server.migrate import upgrade
from tests.support.receiver import Received, Receiver
from tests.support.seed import add_event, add_job, add_tenant, make_settings
from tests.support.waiting import wait_for
from webhooks.dispatcher import Dispatcher
from webhooks.tables import WebhookDelivery


def rows(scratch_db) -> list[WebhookDelivery]:  # type: ignore[no-untyped-def]
    with scratch_db() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.event_seq)))


def fast_forward(scratch_db) -> None:  # type: ignore[no-untyped-def]
    """Make every delivery in backoff due now (instead of waiting out the schedule)."""
    with scratch_db() as s, s.begin():
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
            .values(next_attempt_at=utcnow())
        )


def test_progress_is_coalesced_behind_a_dead_receiver(scratch_db, scratch_db_url, receiver) -> None:  # type: ignore[no-untyped-def]
    alive = threading.Event()
    receiver.behaviour = lambda n, req: (200 if alive.is_set() else 503, {}, 0.0)
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        add_event(s, job, "job.queued")
        job_id = job.id
    d = Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=[60] * 5), scratch_db)
    d.run_once()  # job.queued fails and backs off for a minute
    for batch in range(5):
        with scratch_db() as s, s.begin():
            j = s.get(type(job), job_id)
            last = [add_event(s, j, "job.progress", step=batch * 100 + i).id for i in range(100)][-1]
        d.run_once()
    with scratch_db() as s, s.begin():
        terminal = add_event(s, s.get(type(job), job_id), "job.succeeded").id
    d.run_once()
    live = [(r.event_type, r.status) for r in rows(scratch_db)]
    # 500 progress events became one waiting delivery; the terminal event is never merged.
    assert live == [("job.queued", "pending"), ("job.progress", "waiting"), ("job.succeeded", "waiting")]
    assert len(rows(scratch_db)) == 3  # replaced progress rows are gone, not piled up
    alive.set()
    fast_forward(scratch_db)
    for _ in range(5):
        d.run_once()
    d.close()
    assert receiver.types()[1:] == ["job.queued", "job.progress", "job.succeeded"]
    assert receiver.ids()[2:] == [last, terminal]


def test_new_progress_keeps_the_backoff_of_the_one_it_replaces(scratch_db, scratch_db_url, receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.behaviour = lambda n, req: (500, {}, 0.0)
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        add_event(s, job, "job.progress", step=1)
        job_id = job.id
    d = Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=[60]), scratch_db)
    d.run_once()
    with scratch_db() as s, s.begin():
        add_event(s, s.get(type(job), job_id), "job.progress", step=2)
    assert d.run_once() == 0  # not sent at once to a receiver that is failing
    d.close()
    [new] = rows(scratch_db)
    assert new.status == "pending" and new.attempts == 0
    assert new.next_attempt_at > utcnow() + timedelta(seconds=45)
    assert len(receiver.requests) == 1


def test_event_filters_and_tenant_default(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with Receiver() as job_rx, Receiver() as default_rx:
        with scratch_db() as s, s.begin():
            tenant = add_tenant(s, default_webhook_url=default_rx.url, default_webhook_events=["job.failed"])
            filtered = add_job(s, tenant, job_rx.url, events=["succeeded", "job.queued"])
            defaulted = add_job(s, tenant, None)
            nobody = add_job(s, add_tenant(s), None)
            for job in (filtered, defaulted, nobody):
                for kind in ("job.queued", "job.started", "job.progress", "job.succeeded", "job.failed"):
                    add_event(s, job, kind)
        d = Dispatcher(make_settings(scratch_db_url), scratch_db)
        for _ in range(4):
            d.run_once()
        d.close()
        assert job_rx.types() == ["job.queued", "job.succeeded"]
        assert default_rx.types() == ["job.failed"]
        assert {r.job_id for r in rows(scratch_db)} == {filtered.id, defaulted.id}


def run_until_received(d: Dispatcher, receiver: Receiver, count: int) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: len(receiver.requests) >= count, 10, what="the state this test expects")
        time.sleep(0.2)  # room for a request too many to show up
    finally:
        stop.set()
        thread.join()
        d.close()


def test_order_is_kept_when_a_receiver_blinks(scratch_db, scratch_db_url, receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.behaviour = lambda n, req: (500 if n < 1 else 200, {}, 0.0)
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        ids = [
            add_event(s, job, kind).id
            for kind in ("job.queued", "job.started", "job.progress", "job.succeeded")
        ]
    run_until_received(
        Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=[0.01] * 3), scratch_db), receiver, 5
    )
    # The later events waited for the first one's retry, which succeeded: the receiver saw them in order.
    assert receiver.ids() == [ids[0], *ids]


def test_a_failing_event_holds_the_rest_one_retry_interval_only(scratch_db, scratch_db_url, receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.behaviour = lambda n, req: (500 if n < 2 else 200, {}, 0.0)
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        ids = [
            add_event(s, job, kind).id
            for kind in ("job.queued", "job.started", "job.progress", "job.succeeded")
        ]
    run_until_received(
        Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=[0.01] * 3), scratch_db), receiver, 6
    )
    # job.queued failed twice: at its retry the others went right after it, in order, and it went
    # again at its own next attempt (not the others after its exhaustion).
    assert receiver.ids() == [ids[0], ids[0], ids[1], ids[2], ids[3], ids[0]]
    assert [r.status for r in rows(scratch_db)] == ["succeeded"] * 4


def test_a_stalled_send_is_taken_over_after_its_lease(scratch_db, scratch_db_url, receiver) -> None:  # type: ignore[no-untyped-def]
    """A dispatcher stuck on a request holds the delivery only for its lease; another one then
    delivers it, and the stuck one's late result changes nothing."""
    release = threading.Event()

    def first_hangs(n: int, request: Received) -> tuple[int, dict[str, str], float]:
        if n == 0:
            release.wait(10)
            return 500, {}, 0.0
        return 204, {}, 0.0

    receiver.behaviour = first_hangs
    with scratch_db() as s, s.begin():
        event_id = add_event(s, add_job(s, add_tenant(s), receiver.url), "job.succeeded").id
    settings = make_settings(scratch_db_url)
    stalled, survivor = Dispatcher(settings, scratch_db), Dispatcher(settings, scratch_db)
    stuck = threading.Thread(target=stalled.run_once)
    stuck.start()
    try:
        wait_for(lambda: receiver.requests, 5, what="the stalled dispatcher's request")
        assert survivor.run_once() == 0  # the lease holds
        with scratch_db() as s, s.begin():  # time passes beyond the lease
            s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        assert survivor.run_once() == 1
    finally:
        release.set()  # the stalled request ends with a 500, recorded under a claim that is no more
        stuck.join()
    [row] = rows(scratch_db)
    assert (row.status, row.attempts, row.last_status_code) == ("succeeded", 1, 204)
    assert receiver.ids() == [event_id, event_id]
    stalled.close()
    survivor.close()


def test_embedded_sqlite_mode(tmp_path, receiver) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    engine = make_database(url)
    sqlite_db = make_session_factory(engine)
    with sqlite_db() as s, s.begin():
        job = add_job(s, add_tenant(s), receiver.url)
        ids = [add_event(s, job, kind).id for kind in ("job.queued", "job.started", "job.succeeded")]
    d = Dispatcher(make_settings(url), sqlite_db)
    assert not d.skip_locked
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: len(receiver.requests) == 3, 10, what="the three events delivered")
    finally:
        stop.set()
        thread.join()
        d.close()
    assert receiver.ids() == ids
    assert [r.status for r in rows(sqlite_db)] == ["succeeded"] * 3
    engine.dispose()
