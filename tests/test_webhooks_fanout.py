"""Fan-out rules against real PostgreSQL: progress coalescing, event filters, tenant defaults,
per-job order behind a failing delivery, lease takeover, and the embedded SQLite mode."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from inference_server.db import make_database, make_session_factory
from inference_server.db.base import utcnow
from tests.webhook_support import (
    Receiver,
    add_event,
    add_job,
    add_tenant,
    make_settings,
    migrate,
    wait_for,
)
from webhooks.dispatcher import Dispatcher
from webhooks.tables import WebhookDelivery


@pytest.fixture
def rx() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def rows(sf) -> list[WebhookDelivery]:  # type: ignore[no-untyped-def]
    with sf() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.event_seq)))


def types(receiver: Receiver) -> list[str]:
    return [json.loads(r.body)["type"] for r in receiver.requests]


def fast_forward(sf) -> None:  # type: ignore[no-untyped-def]
    """Make every delivery in backoff due now (instead of waiting out the schedule)."""
    with sf() as s, s.begin():
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
            .values(next_attempt_at=utcnow())
        )


def test_progress_is_coalesced_behind_a_dead_receiver(sf, db_url, rx) -> None:  # type: ignore[no-untyped-def]
    alive = threading.Event()
    rx.behaviour = lambda n, req: (200 if alive.is_set() else 503, {}, 0.0)
    with sf() as s, s.begin():
        job = add_job(s, add_tenant(s), rx.url)
        add_event(s, job, "job.queued")
        job_id = job.id
    d = Dispatcher(make_settings(db_url, webhook_retry_delays=[60] * 5), sf)
    d.run_once()  # job.queued fails and backs off for a minute
    for batch in range(5):
        with sf() as s, s.begin():
            j = s.get(type(job), job_id)
            last = [add_event(s, j, "job.progress", step=batch * 100 + i).id for i in range(100)][-1]
        d.run_once()
    with sf() as s, s.begin():
        terminal = add_event(s, s.get(type(job), job_id), "job.succeeded").id
    d.run_once()
    live = [(r.event_type, r.status) for r in rows(sf)]
    # 500 progress events became one waiting delivery; the terminal event is never merged.
    assert live == [("job.queued", "pending"), ("job.progress", "waiting"), ("job.succeeded", "waiting")]
    assert len(rows(sf)) == 3  # replaced progress rows are gone, not piled up
    alive.set()
    fast_forward(sf)
    for _ in range(5):
        d.run_once()
    d.close()
    assert types(rx)[1:] == ["job.queued", "job.progress", "job.succeeded"]
    assert [r.headers["webhook-id"] for r in rx.requests[2:]] == [last, terminal]


def test_new_progress_keeps_the_backoff_of_the_one_it_replaces(sf, db_url, rx) -> None:  # type: ignore[no-untyped-def]
    rx.behaviour = lambda n, req: (500, {}, 0.0)
    with sf() as s, s.begin():
        job = add_job(s, add_tenant(s), rx.url)
        add_event(s, job, "job.progress", step=1)
        job_id = job.id
    d = Dispatcher(make_settings(db_url, webhook_retry_delays=[60]), sf)
    d.run_once()
    with sf() as s, s.begin():
        add_event(s, s.get(type(job), job_id), "job.progress", step=2)
    assert d.run_once() == 0  # not sent at once to a receiver that is failing
    d.close()
    [new] = rows(sf)
    assert new.status == "pending" and new.attempts == 0
    assert new.next_attempt_at > utcnow() + timedelta(seconds=45)
    assert len(rx.requests) == 1


def test_event_filters_and_tenant_default(sf, db_url) -> None:  # type: ignore[no-untyped-def]
    job_rx, default_rx = Receiver(), Receiver()
    try:
        with sf() as s, s.begin():
            tenant = add_tenant(s, default_webhook_url=default_rx.url, default_webhook_events=["job.failed"])
            filtered = add_job(s, tenant, job_rx.url, events=["succeeded", "job.queued"])
            defaulted = add_job(s, tenant, None)
            nobody = add_job(s, add_tenant(s), None)
            for job in (filtered, defaulted, nobody):
                for kind in ("job.queued", "job.started", "job.progress", "job.succeeded", "job.failed"):
                    add_event(s, job, kind)
        d = Dispatcher(make_settings(db_url), sf)
        for _ in range(4):
            d.run_once()
        d.close()
        assert types(job_rx) == ["job.queued", "job.succeeded"]
        assert types(default_rx) == ["job.failed"]
        assert {r.job_id for r in rows(sf)} == {filtered.id, defaulted.id}
    finally:
        job_rx.close()
        default_rx.close()


def run_until_received(d: Dispatcher, rx: Receiver, count: int) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: len(rx.requests) >= count, timeout=10)
        time.sleep(0.2)  # room for a request too many to show up
    finally:
        stop.set()
        thread.join()
        d.close()


def test_order_is_kept_when_a_receiver_blinks(sf, db_url, rx) -> None:  # type: ignore[no-untyped-def]
    rx.behaviour = lambda n, req: (500 if n < 1 else 200, {}, 0.0)
    with sf() as s, s.begin():
        job = add_job(s, add_tenant(s), rx.url)
        ids = [
            add_event(s, job, kind).id
            for kind in ("job.queued", "job.started", "job.progress", "job.succeeded")
        ]
    run_until_received(Dispatcher(make_settings(db_url, webhook_retry_delays=[0.01] * 3), sf), rx, 5)
    # The later events waited for the first one's retry, which succeeded: the receiver saw them in order.
    assert rx.ids() == [ids[0], *ids]


def test_a_failing_event_holds_the_rest_one_retry_interval_only(sf, db_url, rx) -> None:  # type: ignore[no-untyped-def]
    rx.behaviour = lambda n, req: (500 if n < 2 else 200, {}, 0.0)
    with sf() as s, s.begin():
        job = add_job(s, add_tenant(s), rx.url)
        ids = [
            add_event(s, job, kind).id
            for kind in ("job.queued", "job.started", "job.progress", "job.succeeded")
        ]
    run_until_received(Dispatcher(make_settings(db_url, webhook_retry_delays=[0.01] * 3), sf), rx, 6)
    # job.queued failed twice: at its retry the others went right after it, in order, and it went
    # again at its own next attempt (not the others after its exhaustion).
    assert rx.ids() == [ids[0], ids[0], ids[1], ids[2], ids[3], ids[0]]
    assert [r.status for r in rows(sf)] == ["succeeded"] * 4


def test_an_abandoned_claim_is_taken_over_after_its_lease(sf, db_url, rx) -> None:  # type: ignore[no-untyped-def]
    with sf() as s, s.begin():
        event_id = add_event(s, add_job(s, add_tenant(s), rx.url), "job.succeeded").id
    crashed, survivor = Dispatcher(make_settings(db_url), sf), Dispatcher(make_settings(db_url), sf)
    with sf() as s, s.begin():
        from webhooks.fanout import fan_out

        fan_out(s)
    [claim] = crashed._claim(10)  # claimed, then the process "dies" before sending
    assert survivor.run_once() == 0  # the lease holds
    with sf() as s, s.begin():  # time passes beyond the lease
        s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    assert survivor.run_once() == 1
    from webhooks.delivery import AttemptResult

    crashed._record(
        [(claim, AttemptResult(utcnow(), 0.0, status_code=500, error="late"))]
    )  # a zombie's result
    [row] = rows(sf)
    assert (row.status, row.attempts, row.last_status_code) == ("succeeded", 1, 204)
    assert rx.ids() == [event_id]
    crashed.close()
    survivor.close()


def test_embedded_sqlite_mode(tmp_path, rx) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    migrate(url)
    engine = make_database(url)
    sf = make_session_factory(engine)
    with sf() as s, s.begin():
        job = add_job(s, add_tenant(s), rx.url)
        ids = [add_event(s, job, kind).id for kind in ("job.queued", "job.started", "job.succeeded")]
    d = Dispatcher(make_settings(url), sf)
    assert not d.skip_locked
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: len(rx.requests) == 3, timeout=10)
    finally:
        stop.set()
        thread.join()
        d.close()
    assert rx.ids() == ids
    assert [r.status for r in rows(sf)] == ["succeeded"] * 3
    engine.dispose()
