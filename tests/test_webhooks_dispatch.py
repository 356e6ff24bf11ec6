"""The dispatcher against real PostgreSQL and real HTTP receivers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import standardwebhooks
from sqlalchemy import select, text

from inference_server.db.base import utcnow
from tests.support.seed import add_event, add_job, add_tenant, make_settings
from tests.support.waiting import wait_for
from webhooks import WebhookVerificationError, verify
from webhooks.dispatcher import Dispatcher
from webhooks.tables import WebhookAttempt, WebhookDelivery


def deliveries(scratch_db) -> list[WebhookDelivery]:  # type: ignore[no-untyped-def]
    with scratch_db() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.event_seq)))


def run_until(dispatcher: Dispatcher, predicate: Callable[[], bool], what: str) -> None:
    """Run dispatcher passes until ``predicate`` holds."""

    def step() -> bool:
        if not dispatcher.run_once():
            time.sleep(0.02)
        return predicate()

    wait_for(step, 10, interval=0, what=what)


def test_fails_twice_then_accepted_with_the_same_id(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver(lambda n, req: (500 if n < 2 else 200, {}, 0.0))
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        secret = tenant.webhook_secret
        event = add_event(s, add_job(s, tenant, rx.url), "job.succeeded", status="succeeded")
        event_id = event.id
    d = Dispatcher(make_settings(scratch_db_url), scratch_db)
    run_until(d, lambda: len(rx.requests) >= 3, "three attempts")
    for _ in range(3):
        d.run_once()
    d.close()
    assert rx.ids() == [event_id] * 3  # the id never changes; nothing after the 2xx
    for req in rx.requests:
        assert verify(req.body, req.headers, secret)["data"]["id"]
        assert standardwebhooks.Webhook(secret).verify(req.body, req.headers)["type"] == "job.succeeded"
    [row] = deliveries(scratch_db)
    assert (row.status, row.attempts, row.last_status_code) == ("succeeded", 3, 200)
    assert row.delivered_at is not None
    with scratch_db() as s:
        codes = s.scalars(select(WebhookAttempt.status_code).order_by(WebhookAttempt.number)).all()
    assert codes == [500, 500, 200]


def test_exhausted_after_the_last_attempt_then_replayable(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    from webhooks.service import list_deliveries, replay_delivery

    rx = make_receiver(lambda n, req: (503 if n < 3 else 204, {}, 0.0))
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        job = add_job(s, tenant, rx.url)
        add_event(s, job, "job.failed")
        tenant_id, job_id = tenant.id, job.id
    d = Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=[0.01, 0.01]), scratch_db)
    run_until(d, lambda: deliveries(scratch_db)[0].status == "exhausted", "the delivery exhausted")
    assert len(rx.requests) == 3 and deliveries(scratch_db)[0].next_attempt_at is None
    with scratch_db() as s:
        [row] = list_deliveries(s, tenant_id, job_id)
        assert [a.status_code for a in row.attempt_log] == [503, 503, 503]
        replay_delivery(s, tenant_id, row.id)
    run_until(d, lambda: deliveries(scratch_db)[0].status == "succeeded", "the delivery to succeed")
    d.close()
    assert len(set(rx.ids())) == 1 and len(rx.requests) == 4


def test_retry_after_is_honoured(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver(lambda n, req: (429, {"Retry-After": "30"}, 0.0))
    with scratch_db() as s, s.begin():
        add_event(s, add_job(s, add_tenant(s), rx.url), "job.queued")
    d = Dispatcher(make_settings(scratch_db_url), scratch_db)
    assert d.run_once() == 1
    d.close()
    [row] = deliveries(scratch_db)
    assert row.status == "pending" and row.last_status_code == 429
    assert row.next_attempt_at - utcnow() > timedelta(seconds=25)


def test_410_stops_delivering_to_that_url(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver(lambda n, req: (410, {}, 0.0))
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        add_event(s, add_job(s, tenant, rx.url), "job.queued")
    d = Dispatcher(make_settings(scratch_db_url), scratch_db)
    d.run_once()
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s, name=None)
        other_tenant_job = add_job(s, tenant, rx.url)
        add_event(s, other_tenant_job, "job.queued")
    with scratch_db() as s, s.begin():
        same_tenant = s.get(type(tenant), deliveries(scratch_db)[0].tenant_id)
        add_event(s, add_job(s, same_tenant, rx.url), "job.succeeded")
    for _ in range(3):
        d.run_once()
    d.close()
    rows = deliveries(scratch_db)
    statuses = [(r.tenant_id == rows[0].tenant_id, r.status) for r in rows]
    # The URL is gone for the tenant that got the 410; another tenant's deliveries are its own business.
    assert statuses.count((True, "gone")) == 2
    assert len(rx.requests) == 2  # the first delivery, and the other tenant's (which also got a 410)


def test_redirect_to_a_private_address_is_not_followed(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    inner = make_receiver()
    rx = make_receiver(
        lambda n, req: (302, {"Location": inner.url.replace("127.0.0.1", "10.0.0.1")}, 0.0)
    )
    rx2 = make_receiver(lambda n, req: (307, {"Location": inner.url}, 0.0))
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        add_event(s, add_job(s, tenant, rx.url), "job.succeeded")
        add_event(s, add_job(s, tenant, rx2.url), "job.succeeded")
    d = Dispatcher(make_settings(scratch_db_url, webhook_retry_delays=[0.01]), scratch_db)
    run_until(d, lambda: all(r.status == "exhausted" for r in deliveries(scratch_db)), "both exhausted")
    d.close()
    assert inner.requests == []
    assert {r.last_status_code for r in deliveries(scratch_db)} == {302, 307}
    assert all("not followed" in (r.last_error or "") for r in deliveries(scratch_db))


def test_private_webhook_url_refused_at_send(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver()
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        add_event(s, add_job(s, tenant, rx.url.replace("127.0.0.1", "localhost")), "job.succeeded")
    d = Dispatcher(make_settings(scratch_db_url, allow_private_networks=False), scratch_db)
    d.run_once()
    d.close()
    [row] = deliveries(scratch_db)
    assert row.status == "exhausted" and row.last_error.startswith("unsafe_url")
    assert rx.requests == []


def rotate_cli(database_url: str, tenant: str) -> str:
    """``inference-server keys rotate-webhook-secret``, run as an operator would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_server.cli.main",
            "keys",
            "rotate-webhook-secret",
            "--tenant",
            tenant,
        ],
        env={**env, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    secret = json.loads(out.strip().splitlines()[-1])["webhook_secret"]
    assert secret.startswith("whsec_")
    return secret


def test_signatures_during_secret_rotation(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver()
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        old_secret, name = tenant.webhook_secret, tenant.name
        job = add_job(s, tenant, rx.url)
        add_event(s, job, "job.queued")
        job_id = job.id
    d = Dispatcher(make_settings(scratch_db_url), scratch_db)
    d.run_once()
    new_secret = rotate_cli(scratch_db_url, name)
    with scratch_db() as s, s.begin():
        add_event(s, s.get(type(job), job_id), "job.started")
    d.run_once()
    with scratch_db() as s, s.begin():  # the grace period ends
        t = s.get(type(tenant), tenant.id)
        t.previous_secret_expires_at = utcnow() - timedelta(seconds=1)
        add_event(s, s.get(type(job), job_id), "job.succeeded")
    d.run_once()
    d.close()
    before, during, after = rx.requests
    verify(before.body, before.headers, old_secret)
    with pytest.raises(WebhookVerificationError):
        verify(before.body, before.headers, new_secret)
    assert len(during.headers["webhook-signature"].split()) == 2
    for secret in (old_secret, new_secret):
        verify(during.body, during.headers, secret)
        standardwebhooks.Webhook(secret).verify(during.body, during.headers)
    assert len(after.headers["webhook-signature"].split()) == 1
    standardwebhooks.Webhook(new_secret).verify(after.body, after.headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(old_secret).verify(after.body, after.headers)


def test_parallel_dispatchers_never_double_deliver(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver()
    expected: dict[str, list[str]] = {}
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        jobs = [add_job(s, tenant, rx.url) for _ in range(40)]
        for kind in ("job.queued", "job.started", "job.succeeded"):
            for job in jobs:
                expected.setdefault(job.id, []).append(add_event(s, job, kind).id)
    settings = make_settings(scratch_db_url)
    stop = threading.Event()
    dispatchers = [Dispatcher(settings, scratch_db) for _ in range(2)]
    threads = [threading.Thread(target=d.run, args=(stop,)) for d in dispatchers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(rx.requests) >= 120, 20, what="120 deliveries")
        time.sleep(0.3)  # room for a double delivery to show up
    finally:
        stop.set()
        for t in threads:
            t.join()
        for d in dispatchers:
            d.close()
    ids = rx.ids()
    assert len(ids) == len(set(ids)) == 120
    received: dict[str, list[str]] = {}
    for req in rx.requests:
        received.setdefault(verify(req.body, req.headers, tenant.webhook_secret)["data"]["id"], []).append(
            req.headers["webhook-id"]
        )
    assert received == expected  # every job's events in the order they happened
    assert all(r.status == "succeeded" for r in deliveries(scratch_db))


def test_slow_receiver_does_not_block_others(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    slow_seconds = 3.0
    slow = make_receiver(lambda n, req: (200, {}, slow_seconds))
    fast = make_receiver()
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        for _ in range(12):
            add_event(s, add_job(s, tenant, slow.url), "job.succeeded")
        for _ in range(10):
            add_event(s, add_job(s, tenant, fast.url), "job.succeeded")
    stop = threading.Event()
    d = Dispatcher(make_settings(scratch_db_url, webhook_concurrency=8), scratch_db)
    thread = threading.Thread(target=d.run, args=(stop,))
    t0 = time.monotonic()
    thread.start()
    try:
        wait_for(lambda: len(fast.requests) == 10, 5, what="the fast receiver's 10 deliveries")
        fast_done = time.monotonic() - t0
    finally:
        stop.set()
        thread.join()
        d.close()
    # Every fast delivery went out before any slow one could have been answered: none waited
    # behind the slow receiver (a bound on ordering, not a timing of this machine).
    assert fast_done < slow_seconds, fast_done
    assert (
        len(slow.requests) <= d.limits.unknown + d.limits.slow
    )  # the slow URL never had more than its share


def test_timeout_is_a_failed_attempt(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver(lambda n, req: (200, {}, 1.0 if n == 0 else 0.0))
    with scratch_db() as s, s.begin():
        add_event(s, add_job(s, add_tenant(s), rx.url), "job.succeeded")
    d = Dispatcher(make_settings(scratch_db_url, webhook_timeout=0.3), scratch_db)
    d.run_once()
    [row] = deliveries(scratch_db)
    assert row.status == "pending" and row.last_status_code is None and "Timeout" in row.last_error
    run_until(d, lambda: deliveries(scratch_db)[0].status == "succeeded", "the delivery to succeed")
    d.close()
    assert len(set(rx.ids())) == 1


def test_dispatcher_survives_a_lost_database_connection(scratch_db, scratch_db_url, make_receiver) -> None:  # type: ignore[no-untyped-def]
    rx = make_receiver()
    with scratch_db() as s, s.begin():
        tenant = add_tenant(s)
        tenant_id = tenant.id
        add_event(s, add_job(s, tenant, rx.url), "job.queued")
    stop = threading.Event()
    d = Dispatcher(make_settings(scratch_db_url), scratch_db)
    thread = threading.Thread(target=d.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: len(rx.requests) == 1, 5, what="the first delivery")
        # The database drops every other connection (a restart, a failover).
        with scratch_db() as s, s.begin():
            killed = s.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        assert killed >= 1
        with scratch_db() as s, s.begin():
            add_event(s, add_job(s, s.get(type(tenant), tenant_id), rx.url), "job.succeeded")
        wait_for(lambda: len(rx.requests) == 2, 10, what="the delivery after the reconnect")
    finally:
        stop.set()
        thread.join()
        d.close()
    assert all(r.status == "succeeded" for r in deliveries(scratch_db))
