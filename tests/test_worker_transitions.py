"""The worker's transitions of a job on the real PostgreSQL: claim decisions, the events each writes,
and a database outage at the end of a job, which retries the job instead of stranding it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import make_url

from inference_server.db import Job, JobEvent, JobOutput, make_database, make_session_factory
from inference_server.devtools.faults.proxy import TcpProxy
from inference_server.jobs import transitions
from inference_server.jobs.enums import ClaimRefusal, RunOutcome
from inference_server.jobs.service import JobContext, submit
from inference_server.jobs.spec import JobRequest
from inference_server.storage import open_storage
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a mill by a river", "width": 64, "height": 64, "steps": 3, "seed": 5}


@pytest.fixture(scope="module")
def db(settings, scratch_db_url) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A tenant and the job service's context on the module's scratch database: the running
    system's relay and worker must not take these jobs."""
    from api.auth import create_tenant_key
    from inference_server.registry import load_registry

    engine = make_database(scratch_db_url)
    sf = make_session_factory(engine)
    with sf() as session:
        tenant, _ = create_tenant_key(session, f"transitions-{uuid.uuid4().hex[:6]}")
        session.expunge(tenant)
    local = settings.model_copy(update={"database_url": scratch_db_url})
    ctx = JobContext(local, load_registry(local.models_file), open_storage(local))
    yield {"sf": sf, "ctx": ctx, "tenant": tenant, "settings": local}
    engine.dispose()


def _submit(db: dict[str, Any]) -> str:
    with db["sf"]() as session:
        return submit(session, db["ctx"], db["tenant"], JobRequest.model_validate(BODY)).job_id


def _events(sf, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    with sf() as session:
        return list(
            session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        )


def _claim(sf, job_id: str, *, lease: float = 30.0, max_attempts: int = 3):  # type: ignore[no-untyped-def]
    with sf() as session:
        claim = transitions.claim(session, job_id, max_attempts=max_attempts, lease_seconds=lease, worker="w")
        if isinstance(claim, transitions.Claim):
            transitions.record_claim(session, claim)
        return claim


def test_claim_decides_by_status_and_attempts(db) -> None:  # type: ignore[no-untyped-def]
    sf = db["sf"]
    assert _claim(sf, str(uuid.uuid4())) == ClaimRefusal.MISSING
    job_id = _submit(db)
    claim = _claim(sf, job_id, lease=0.0)
    assert isinstance(claim, transitions.Claim) and claim.attempt == 1
    # Its lease ran out at once: a message for it now takes the job over as a new attempt.
    again = _claim(sf, job_id)
    assert isinstance(again, transitions.Claim) and again.attempt == 2
    # While that lease lives, another message for the job is a duplicate.
    assert _claim(sf, job_id) == ClaimRefusal.OWNED
    # The first attempt can no longer end the job: only the owner writes.
    with sf() as session:
        assert not transitions.succeed(session, claim, [])
    with sf() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=None))
        session.commit()
    assert _claim(sf, job_id, max_attempts=2) == ClaimRefusal.EXHAUSTED
    with sf() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "too_many_attempts")
    assert _claim(sf, job_id) == ClaimRefusal.FINISHED
    assert _events(sf, job_id) == ["job.queued", "job.started", "job.started", "job.failed"]


def test_success_writes_outputs_and_event_once(db) -> None:  # type: ignore[no-untyped-def]
    sf = db["sf"]
    job_id = _submit(db)
    claim = _claim(sf, job_id)
    output = {
        "job_id": job_id,
        "index": 0,
        "uri": "s3://bucket/x.png",
        "content_type": "image/png",
        "width": 64,
        "height": 64,
        "seed": 5,
        "sha256": "ab" * 32,
        "size_bytes": 10,
    }
    with sf() as session:
        assert transitions.succeed(session, claim, [output])
    with sf() as session:
        assert not transitions.succeed(session, claim, [output])
        event = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "job.succeeded")
        ).one()
        assert session.scalar(select(func.count()).where(JobOutput.job_id == job_id)) == 1
    data = event.payload["data"]
    assert data["status"] == "succeeded" and data["attempts"] == 1
    # Stored relative: the API and the dispatcher add the public URL when they read it.
    assert data["outputs"][0]["url"] == f"/v1/jobs/{job_id}/outputs/0"
    assert data["progress"]["percent"] == 100.0


@contextmanager
def _runner_behind_proxy(settings) -> Iterator[tuple[Any, TcpProxy]]:  # type: ignore[no-untyped-def]
    """A job runner in this process whose database connections all pass through a TcpProxy."""
    from inference_server.engine.runner import Engine
    from inference_server.registry import load_registry
    from workers.runner import JobRunner

    url = make_url(settings.database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    engine = make_database(proxied, pool_size=2)
    runner = JobRunner(
        settings,
        make_session_factory(engine),
        open_storage(settings),
        Engine(load_registry(settings.models_file)),
    )
    try:
        yield runner, proxy
    finally:
        engine.dispose()
        proxy.close()


def _state(sf, job_id: str) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    with sf() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status, job.attempts


def test_a_short_database_outage_at_the_end_is_waited_out(db) -> None:  # type: ignore[no-untyped-def]
    with _runner_behind_proxy(db["settings"]) as (runner, proxy):
        job_id = _submit(db)
        put = runner.storage.put

        def put_then_cut(*args: Any, **kwargs: Any) -> str:
            uri = put(*args, **kwargs)  # the image is stored; the database goes away for a moment
            proxy.cut()
            threading.Timer(1.5, proxy.heal).start()
            return uri

        runner.storage.put = put_then_cut  # type: ignore[method-assign]
        assert runner.run(job_id) == RunOutcome.SUCCEEDED
    assert _state(db["sf"], job_id) == ("succeeded", 1)
    assert _events(db["sf"], job_id).count("job.succeeded") == 1


def test_a_long_outage_at_the_end_leaves_the_job_to_the_reconciler(db) -> None:  # type: ignore[no-untyped-def]
    from inference_server.jobs.reconcile import expired_leases

    settings = db["settings"].model_copy(update={"job_end_retry_seconds": 1.0, "job_lease_seconds": 2.0})
    with _runner_behind_proxy(settings) as (runner, proxy):
        job_id = _submit(db)
        put = runner.storage.put

        def put_then_cut(*args: Any, **kwargs: Any) -> str:
            uri = put(*args, **kwargs)
            proxy.cut()
            return uri

        runner.storage.put = put_then_cut  # type: ignore[method-assign]
        assert runner.run(job_id) == RunOutcome.ABANDONED
        assert _state(db["sf"], job_id) == ("running", 1)
        proxy.heal()
        runner.storage.put = put  # type: ignore[method-assign]

        def requeued() -> bool:
            with db["sf"]() as session:
                done = expired_leases(session, max_attempts=3)
                session.commit()
            return done.requeued == 1

        wait_for(requeued, 10, interval=0.2, what="the lease to expire and the job to be queued again")
        assert _state(db["sf"], job_id) == ("queued", 1)
        assert runner.run(job_id) == RunOutcome.SUCCEEDED
    assert _state(db["sf"], job_id) == ("succeeded", 2)
    with db["sf"]() as session:
        assert session.scalar(select(func.count()).where(JobOutput.job_id == job_id)) == 1
    assert _events(db["sf"], job_id).count("job.succeeded") == 1


def test_database_outage_at_claim_leaves_the_job_queued(db) -> None:  # type: ignore[no-untyped-def]
    from workers.runner import ClaimUnavailable

    with _runner_behind_proxy(db["settings"]) as (runner, proxy):
        job_id = _submit(db)
        proxy.cut()
        with pytest.raises(ClaimUnavailable):
            runner.run(job_id)
        assert _state(db["sf"], job_id) == ("queued", 0)
        proxy.heal()
        assert runner.run(job_id) == RunOutcome.SUCCEEDED


def test_a_cancel_is_pushed_to_the_running_jobs_watcher(db) -> None:  # type: ignore[no-untyped-def]
    """With polling pushed out to 30 s, only the NOTIFY from the cancel's transaction can stop
    the run within the test's few seconds."""
    from inference_server.jobs.service import cancel
    from workers.cancels import CancelListener
    from workers.progress import ProgressWatcher

    sf = db["sf"]
    job_id = _submit(db)
    claim = _claim(sf, job_id)
    engine = make_database(db["settings"].database_url, pool_size=1)
    listener = CancelListener(engine)
    try:
        other = _submit(db)  # a cancel of another job is not this job's
        with sf() as session:
            cancel(session, db["ctx"], db["tenant"], other)
        watcher = ProgressWatcher(
            sf,
            job_id,
            claim.attempt,
            progress_interval=0.5,
            poll_interval=30.0,
            cancels=listener,
        )
        with watcher:
            watcher.on_step(1, 50)
            assert not watcher.on_step(2, 50)
            with sf() as session:
                cancel(session, db["ctx"], db["tenant"], job_id)
            wait_for(lambda: watcher.on_step(3, 50), 5, what="the pushed cancel")
    finally:
        listener.close()
        engine.dispose()


def test_one_listener_pushes_every_watchers_cancels_and_rechecks_after_losing_its_connection(db) -> None:  # type: ignore[no-untyped-def]
    """Polling pushed out to 30 s: the watchers of a batch's members and of jobs being finished all
    hear their cancels from the child's one listener, and a cancel made while its connection was
    down (no NOTIFY reaches it then) is found when it connects again."""
    from inference_server.jobs.service import cancel
    from workers.cancels import CancelListener
    from workers.progress import ProgressWatcher

    sf = db["sf"]
    ids = [_submit(db) for _ in range(3)]
    claims = [_claim(sf, job_id) for job_id in ids]
    engine = make_database(db["settings"].database_url, pool_size=1)
    listener = CancelListener(engine)
    watchers = [
        ProgressWatcher(sf, c.job_id, c.attempt, progress_interval=0.5, poll_interval=30.0, cancels=listener)
        for c in claims
    ]
    try:
        for watcher in watchers:
            watcher.start()
            watcher.on_step(1, 50)
        watchers[2].denoised()  # being finished: still pushed
        for job_id in ids[1:]:
            with sf() as session:
                cancel(session, db["ctx"], db["tenant"], job_id)
        wait_for(lambda: watchers[1].canceled and watchers[2].canceled, 5, what="both pushed cancels")
        assert not watchers[0].canceled

        with sf() as session:  # the listener's connection is cut; the cancel's NOTIFY goes nowhere
            session.execute(
                select(func.pg_terminate_backend(text("pid")))
                .select_from(text("pg_stat_activity"))
                .where(text("datname = current_database() AND query LIKE 'LISTEN job_canceled%'"))
            )
            cancel(session, db["ctx"], db["tenant"], ids[0])
        wait_for(lambda: watchers[0].canceled, 5, what="the cancel found after reconnecting")
        assert listener.listening
    finally:
        for watcher in watchers:
            watcher.stop()
        listener.close()
        engine.dispose()


def test_the_listener_holds_one_connection_when_a_watcher_reconnects_during_its_pause(db) -> None:  # type: ignore[no-untyped-def]
    """The listener's connection is cut; a watcher subscribing while the listener's thread waits to
    connect again connects it. The thread then takes that connection rather than opening a second
    (which nothing would read or close), and every subscriber's row is read once, since a cancel
    made while nothing listened was not pushed."""
    from workers.cancels import RECONNECT_SECONDS, CancelListener

    engine = make_database(db["settings"].database_url, pool_size=4)
    sf = make_session_factory(engine)
    listener = CancelListener(engine)
    seen: list[str] = []

    def listeners() -> int:
        with sf() as session:  # a transaction of its own: pg_stat_activity is read once per transaction
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            return int(session.execute(text(query + "AND query LIKE 'LISTEN job_canceled%'")).scalar())

    try:
        listener.subscribe("first", lambda: seen.append("first"))
        wait_for(lambda: "first" in seen, 5, what="the first connection's recheck")
        seen.clear()
        with sf() as session:
            session.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN job_canceled%'"
                )
            )
        wait_for(lambda: not listener.listening, 5, what="the listener to see its connection cut")
        listener.subscribe("second", lambda: seen.append("second"))  # during the thread's pause
        assert listener.listening
        wait_for(lambda: "first" in seen, 5, what="the recheck of every subscriber")
        time.sleep(RECONNECT_SECONDS * 2)  # past the pause, when the thread would connect
        assert listeners() == 1
        seen.clear()
        with sf() as session:
            session.execute(text("SELECT pg_notify('job_canceled', 'second')"))
            session.commit()
        wait_for(lambda: seen == ["second"], 5, what="a cancel pushed on the one connection")
    finally:
        listener.close()
        engine.dispose()


def test_a_run_taken_over_by_a_newer_attempt_is_stopped(db) -> None:  # type: ignore[no-untyped-def]
    """A worker whose lease ran out (it lost the database for longer than the lease) while the job
    was given to another attempt stops at its next check instead of running to the end."""
    from workers.progress import ProgressWatcher

    sf = db["sf"]
    job_id = _submit(db)
    first = _claim(sf, job_id, lease=0.0)
    watcher = ProgressWatcher(sf, job_id, first.attempt, progress_interval=0.5, poll_interval=0.05)
    with watcher:
        assert not watcher.on_step(1, 10)
        second = _claim(sf, job_id)
        assert isinstance(second, transitions.Claim) and second.attempt == 2
        wait_for(lambda: watcher.on_step(2, 10), 5, what="the superseded run to stop")
    assert watcher.superseded


def test_a_run_that_cannot_renew_its_lease_stops_when_it_runs_out(db) -> None:  # type: ignore[no-untyped-def]
    """Cut off from the database, a run cannot know whether the job is still its own: past its last
    lease the reconciler may have given it to another worker, so it stops there."""
    from workers.progress import ProgressWatcher

    url = make_url(db["settings"].database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    engine = make_database(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    try:
        job_id = _submit(db)
        claim = _claim(db["sf"], job_id, lease=2.0)
        watcher = ProgressWatcher(
            make_session_factory(engine), job_id, claim.attempt, progress_interval=0.2, poll_interval=0.05,
            lease_seconds=2.0,
        )  # fmt: skip
        with watcher:
            assert not watcher.on_step(1, 10)
            proxy.cut()
            wait_for(lambda: watcher.on_step(2, 10), 6, what="the run to stop at the end of its lease")
        assert watcher.superseded
    finally:
        engine.dispose()
        proxy.close()


def test_a_running_job_renews_its_lease(db) -> None:  # type: ignore[no-untyped-def]
    from workers.progress import ProgressWatcher

    job_id = _submit(db)
    claim = _claim(db["sf"], job_id, lease=1.5)

    def lease() -> Any:
        with db["sf"]() as session:
            return session.scalar(select(Job.lease_expires_at).where(Job.id == job_id))

    first = lease()
    watcher = ProgressWatcher(
        db["sf"], job_id, claim.attempt, progress_interval=0.2, poll_interval=0.05, lease_seconds=1.5
    )
    with watcher:
        wait_for(lambda: lease() > first, 5, what="the lease to be renewed")
        time.sleep(2.0)  # longer than one lease: still running, still owned
        assert not watcher.on_step(1, 10)


def test_previews_are_announced_in_step_order_when_the_last_flush_meets_a_tick(db) -> None:  # type: ignore[no-untyped-def]
    """The runner flushes the last preview while the watcher's thread may still be storing an
    earlier one: the later step must not be announced (nor stored) first."""
    from workers.previews import LatestPreview
    from workers.progress import ProgressWatcher

    entered, release = threading.Event(), threading.Event()

    class HeldFirstStore(LatestPreview):  # real storage; the first upload is held until released
        def store(self, rgb: Any) -> str:
            if not entered.is_set():
                entered.set()
                release.wait(10)
            return super().store(rgb)

    sf = db["sf"]
    job_id = _submit(db)
    claim = _claim(sf, job_id)
    previews = HeldFirstStore(db["ctx"].storage, job_id)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    watcher = ProgressWatcher(
        sf, job_id, claim.attempt, progress_interval=0.0, poll_interval=0.02, previews=previews
    )
    with watcher:
        previews.offer(38, rgb)
        assert entered.wait(5), "the watcher's tick never stored the preview"
        previews.offer(40, rgb)
        flush = threading.Thread(target=watcher.flush_preview)
        flush.start()
        time.sleep(0.3)  # the flush, unordered, would announce step 40 within this
        release.set()
        flush.join(10)
    with sf() as session:
        steps = session.scalars(
            select(JobEvent.payload).where(JobEvent.job_id == job_id, JobEvent.type == "job.preview")
            .order_by(JobEvent.seq)
        ).all()  # fmt: skip
    assert [p["data"]["preview"]["step"] for p in steps] == [38, 40]
