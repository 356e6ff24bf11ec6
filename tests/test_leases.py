"""The database decides what runs: transient failures go back through the outbox, the reconciler
finds expired leases and lost messages, and messages no worker can use end on ``jobs.dead``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from kombu import Connection, Exchange
from sqlalchemy import select, update

from inference_server.db import Job, JobEvent, OutboxMessage, make_database, make_session_factory
from inference_server.db.base import utcnow
from inference_server.errors import StorageError
from inference_server.jobs import reconcile, transitions
from inference_server.jobs.enums import RunOutcome
from inference_server.jobs.service import JobContext, submit
from inference_server.jobs.spec import JobRequest
from inference_server.registry import load_registry
from inference_server.storage import open_storage
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a tide pool", "width": 64, "height": 64, "steps": 2, "seed": 4}


@pytest.fixture
def local(settings, scratch_db_url, scratch_db) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A job service and an in-process runner on a scratch database (no worker can take its jobs)."""
    from api.auth import create_tenant_key
    from inference_server.engine.runner import Engine
    from workers.runner import JobRunner

    local_settings = settings.model_copy(update={"database_url": scratch_db_url, "job_retry_delays": [30.0]})
    with scratch_db() as session:
        tenant, _ = create_tenant_key(session, f"t-{uuid.uuid4().hex[:6]}")
    ctx = JobContext(local_settings, load_registry(local_settings.models_file), open_storage(local_settings))
    database = make_database(scratch_db_url, pool_size=2)
    runner = JobRunner(
        local_settings, make_session_factory(database), open_storage(local_settings),
        Engine(load_registry(local_settings.models_file)),
    )  # fmt: skip
    yield {"sf": scratch_db, "ctx": ctx, "tenant": tenant, "runner": runner, "settings": local_settings}
    database.dispose()


def _submit(local: dict[str, Any]) -> str:
    with local["sf"]() as session:
        return submit(session, local["ctx"], local["tenant"], JobRequest.model_validate(BODY)).job_id


def _job(local: dict[str, Any], job_id: str) -> Job:
    with local["sf"]() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _unpublished(local: dict[str, Any], job_id: str) -> list[OutboxMessage]:
    with local["sf"]() as session:
        rows = session.scalars(
            select(OutboxMessage).where(OutboxMessage.job_id == job_id, OutboxMessage.published_at.is_(None))
        )
        return list(rows)


def _mark_published(local: dict[str, Any], job_id: str) -> None:
    with local["sf"]() as session:
        stamp = update(OutboxMessage).where(OutboxMessage.job_id == job_id).values(published_at=utcnow())
        session.execute(stamp)
        session.commit()


def test_a_storage_failure_puts_the_job_back_in_its_queue_then_it_succeeds(local) -> None:  # type: ignore[no-untyped-def]
    runner = local["runner"]
    job_id = _submit(local)
    _mark_published(local, job_id)
    put = runner.storage.put

    def down(*args: Any, **kwargs: Any) -> str:
        raise StorageError("storage is unreachable", code="storage_unavailable")

    runner.storage.put = down
    assert runner.run(job_id, queue="jobs.sd15") == RunOutcome.REQUEUED
    job = _job(local, job_id)
    assert (job.status, job.attempts, job.lease_expires_at) == ("queued", 1, None)
    # Its message waits in the outbox for the retry delay, on the job's own queue: never on a
    # queue nobody consumes.
    (message,) = _unpublished(local, job_id)
    assert message.queue == "jobs.sd15" and message.available_at is not None
    assert message.available_at > utcnow() + timedelta(seconds=20)
    runner.storage.put = put
    assert runner.run(job_id, queue="jobs.sd15") == RunOutcome.SUCCEEDED
    job = _job(local, job_id)
    assert (job.status, job.attempts) == ("succeeded", 2)
    with local["sf"]() as session:
        query = select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        types = [t for t in session.scalars(query) if t != "job.progress"]  # ticks depend on timing
    assert types == ["job.queued", "job.started", "job.queued", "job.started", "job.succeeded"]


def test_storage_down_through_every_attempt_fails_with_its_code(local) -> None:  # type: ignore[no-untyped-def]
    runner = local["runner"]
    job_id = _submit(local)

    def down(*args: Any, **kwargs: Any) -> str:
        raise StorageError("storage is unreachable", code="storage_unavailable")

    runner.storage.put = down
    outcomes = []
    for _ in range(local["settings"].job_max_attempts):
        outcomes.append(runner.run(job_id))
    assert outcomes == [RunOutcome.REQUEUED] * (len(outcomes) - 1) + [RunOutcome.FAILED]
    job = _job(local, job_id)
    assert (job.status, job.error_code) == ("failed", "storage_unavailable")


def _expire(local: dict[str, Any], job_id: str) -> None:
    with local["sf"]() as session:
        past = utcnow() - timedelta(seconds=1)
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))
        session.commit()


def test_an_expired_lease_is_queued_again_then_failed_after_the_last_attempt(local) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(local)
    max_attempts = local["settings"].job_max_attempts
    for attempt in range(1, max_attempts + 1):
        with local["sf"]() as session:
            claim = transitions.claim(session, job_id, max_attempts=max_attempts, lease_seconds=30)
            assert isinstance(claim, transitions.Claim) and claim.attempt == attempt
            transitions.record_claim(session, claim)
        _expire(local, job_id)  # the worker died: nobody renews
        with local["sf"]() as session:
            done = reconcile.expired_leases(session, max_attempts=max_attempts)
            session.commit()
        if attempt < max_attempts:
            assert (done.requeued, done.failed) == (1, 0)
            assert _job(local, job_id).status == "queued" and len(_unpublished(local, job_id)) >= 1
        else:
            assert (done.requeued, done.failed) == (0, 1)
    job = _job(local, job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "too_many_attempts", max_attempts)
    # A second reconciler pass (another dispatcher) finds nothing left to do.
    with local["sf"]() as session:
        assert reconcile.expired_leases(session, max_attempts=max_attempts) == reconcile.Pass()


def test_a_live_lease_is_left_alone(local) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(local)
    with local["sf"]() as session:
        claim = transitions.claim(session, job_id, max_attempts=3, lease_seconds=30, worker="w")
        assert isinstance(claim, transitions.Claim)
        transitions.record_claim(session, claim)
    with local["sf"]() as session:
        assert reconcile.expired_leases(session, max_attempts=3).requeued == 0
    assert _job(local, job_id).status == "running"


def test_a_queued_job_whose_message_was_lost_is_published_again(local) -> None:  # type: ignore[no-untyped-def]
    job_id = _submit(local)
    _mark_published(local, job_id)
    with local["sf"]() as session:  # the job waited past the grace
        old = utcnow() - timedelta(seconds=600)
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=old))
        session.commit()
    asked: list[list[str]] = []

    def ready(depth: int):  # type: ignore[no-untyped-def]
        def answer(queues: list[str]) -> dict[str, int | None]:
            asked.append(queues)
            return {q: depth for q in queues}

        return answer

    for depth in (3, None):  # messages still in line, or the broker cannot say: leave it
        with local["sf"]() as session:
            assert reconcile.lost_messages(session, ready(depth), grace=60) == 0  # type: ignore[arg-type]
            session.commit()
    with local["sf"]() as session:
        assert reconcile.lost_messages(session, ready(0), grace=60) == 1
        session.commit()
    assert asked[-1] == ["jobs.sd15"]
    (message,) = _unpublished(local, job_id)
    assert message.queue == "jobs.sd15"
    # Published again just now: not again at the next pass.
    _mark_published(local, job_id)
    with local["sf"]() as session:
        assert reconcile.lost_messages(session, ready(0), grace=60) == 0


def _dead_letters(broker_url: str, marker: str, want: int, timeout: float = 60.0) -> list[Any]:
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    with Connection(broker_url) as conn:
        channel = conn.channel()
        while len(found) < want and time.monotonic() < deadline:
            message = channel.basic_get("jobs.dead", no_ack=False)
            if message is None:
                time.sleep(0.2)
                continue
            body = message.body if isinstance(message.body, str) else message.body.decode("utf-8", "replace")
            text = body + json.dumps(message.headers or {}, default=str)
            if marker in text:
                found.append(message)
                channel.basic_ack(message.delivery_tag)
            else:
                channel.basic_reject(message.delivery_tag, requeue=True)
                time.sleep(0.05)
    return found


def test_messages_no_worker_can_use_end_on_jobs_dead(worker, broker_url, api_client) -> None:  # type: ignore[no-untyped-def]
    """Undecodable bytes, a message of no task, a job id that is not one, and a job that does not
    exist: each ends on ``jobs.dead`` once, the worker stays up, and real jobs still run."""
    from inference_server.publish.topology import RUN_JOB, message_app
    from tests.support.jobs import submit as submit_http
    from tests.support.jobs import wait_done

    marker = uuid.uuid4().hex
    missing = str(uuid.uuid4())
    app = message_app(broker_url)
    jobs = Exchange("jobs", type="direct", durable=True)
    with Connection(broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            f"not json {marker}".encode(), exchange=jobs, routing_key="jobs.sd15",
            content_type="application/json", content_encoding="utf-8",
        )  # fmt: skip
        producer.publish({"marker": marker}, exchange=jobs, routing_key="jobs.sd15", serializer="json")
        for arg in (f"not-a-job-{marker}", missing):
            headers, properties, body, _ = app.amqp.as_task_v2(str(uuid.uuid4()), RUN_JOB, args=[arg])
            producer.publish(
                body, exchange=jobs, routing_key="jobs.sd15", headers=headers, serializer="json",
                **{k: v for k, v in properties.items() if k in ("correlation_id", "reply_to")},
            )  # fmt: skip
    assert len(_dead_letters(broker_url, marker, 3)) == 3
    assert len(_dead_letters(broker_url, missing, 1)) == 1
    assert worker.proc.poll() is None
    assert wait_done(api_client, submit_http(api_client, BODY)["id"])["status"] == "succeeded"


def test_a_message_sent_back_reaches_its_own_queue(settings, broker_url) -> None:  # type: ignore[no-untyped-def]
    """A worker that could not claim (its database is down) sends the message back to the queue it
    came from, never to Celery's default queue, which no worker declares."""
    from inference_server.publish.topology import job_queue
    from workers import messages
    from workers.celery_app import create_celery_app
    from workers.child import ChildRunner

    worker_settings = settings.model_copy(update={"broker_url": broker_url})
    app = create_celery_app(worker_settings, ["jobs.sd15b"], ChildRunner(worker_settings, []))
    queue = job_queue("jobs.sd15b", consumer_timeout_ms=worker_settings.consumer_timeout_ms)
    job_id = str(uuid.uuid4())
    with Connection(broker_url) as conn:
        queue.bind(conn.default_channel).declare()
        messages.send_back(app, job_id, "jobs.sd15b", reason="database_unavailable", pause=0.0)
        message = wait_for(
            lambda: conn.default_channel.basic_get("jobs.sd15b", no_ack=True), 10, what="the message"
        )
    assert message.headers["id"] == job_id and message.headers["task"] == "inference.run_job"
