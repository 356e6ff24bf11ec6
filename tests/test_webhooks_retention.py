"""Retention against real PostgreSQL (and real file and S3 storage for outputs): old rows go in
bounded batches, young ones stay, nothing a delivery still needs is deleted, several pruners can
run side by side, and the dispatcher prunes on its own."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import boto3
import pytest
from sqlalchemy import event, func, insert, select, update

from inference_server.db import (
    Job,
    JobEvent,
    JobOutput,
    OutboxMessage,
    Tenant,
    make_database,
    make_session_factory,
)
from inference_server.db.base import utcnow
from inference_server.errors import NotFound
from inference_server.migrate import upgrade as migrate
from inference_server.storage import open_storage
from tests.support.seed import add_job, add_tenant, make_settings
from tests.support.waiting import wait_for
from webhooks.dispatcher import Dispatcher
from webhooks.retention import Pruner
from webhooks.tables import WebhookAttempt, WebhookDelivery

OLD = timedelta(days=10)  # past every default retention
BATCH = 100


def seed_events(s: Any, job: Any, count: int, *, age: timedelta, **fields: Any) -> list[int]:
    """``count`` events of ``job`` created ``age`` ago; returns their seqs."""
    at = utcnow() - age
    rows = [
        {
            "id": f"msg_{uuid.uuid4().hex}",
            "job_id": job.id,
            "tenant_id": job.tenant_id,
            "type": fields.get("type", "job.progress"),
            "payload": {"type": "job.progress", "data": {"id": job.id}},
            "fanned_out": fields.get("fanned_out", True),
            "created_at": at,
        }
        for _ in range(count)
    ]
    return list(s.scalars(insert(JobEvent).returning(JobEvent.seq), rows))


def seed_delivery(s: Any, job: Any, seq: int, *, status: str, age: timedelta, attempts: int = 2) -> str:
    at = utcnow() - age
    delivery_id = str(uuid.uuid4())
    s.execute(
        insert(WebhookDelivery).values(
            id=delivery_id,
            event_seq=seq,
            event_id=f"msg_{uuid.uuid4().hex}",
            event_type="job.succeeded",
            job_id=job.id,
            tenant_id=job.tenant_id,
            url=job.webhook_url,
            status=status,
            attempts=attempts,
            retry_base=0,
            next_attempt_at=at if status == "pending" else None,
            created_at=at,
            updated_at=at,
        )
    )
    s.execute(
        insert(WebhookAttempt),
        [
            {"delivery_id": delivery_id, "number": n, "started_at": at, "duration_ms": 3}
            for n in range(attempts)
        ],
    )
    return delivery_id


def seed_outbox(s: Any, job: Any, count: int, *, published: timedelta | None, age: timedelta) -> None:
    at = utcnow() - age
    s.execute(
        insert(OutboxMessage),
        [
            {
                "job_id": job.id,
                "queue": "jobs.sd15",
                "created_at": at,
                "published_at": None if published is None else utcnow() - published,
            }
            for _ in range(count)
        ],
    )


def count(scratch_db, model: Any, *where: Any) -> int:  # type: ignore[no-untyped-def]
    with scratch_db() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def deletes_per_statement(scratch_db) -> list[int]:  # type: ignore[no-untyped-def]
    """Rows each DELETE statement removes from now on (cascaded rows are not counted by PostgreSQL)."""
    seen: list[int] = []

    def record(conn, cursor, statement, params, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append(cursor.rowcount)

    event.listen(scratch_db.kw["bind"], "after_cursor_execute", record)
    return seen


def pruner(scratch_db, scratch_db_url: str, **overrides: Any) -> Pruner:  # type: ignore[no-untyped-def]
    settings = make_settings(scratch_db_url, prune_batch_size=BATCH, **overrides)
    return Pruner(settings, scratch_db.begin, skip_locked=True, storage=lambda: open_storage(settings))


def test_old_rows_go_in_batches_and_young_ones_stay(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), "http://127.0.0.1:9/hook")
        old_events = seed_events(s, job, 1050, age=OLD)
        young_events = seed_events(s, job, 20, age=timedelta(days=1))
        delivered = seed_events(s, job, 150, age=OLD, type="job.succeeded")
        for seq in delivered:
            seed_delivery(s, job, seq, status="succeeded", age=OLD)
        [recent_seq] = seed_events(s, job, 1, age=OLD, type="job.succeeded")
        seed_delivery(s, job, recent_seq, status="succeeded", age=timedelta(days=1))
        unfanned = seed_events(s, job, 3, age=OLD, fanned_out=False)
        seed_outbox(s, job, 730, published=timedelta(hours=30), age=timedelta(hours=31))
        seed_outbox(s, job, 5, published=timedelta(hours=1), age=timedelta(hours=1))
        seed_outbox(s, job, 4, published=None, age=timedelta(days=3))  # never published: kept
        job_id = job.id
    statements = deletes_per_statement(scratch_db)

    assert pruner(scratch_db, scratch_db_url).step(budget=60) is False  # caught up within the budget

    assert statements and max(statements) <= BATCH
    assert sum(statements) == 1050 + 150 + 150 + 730  # events, deliveries, their events, outbox rows
    with scratch_db() as s:
        left = set(s.scalars(select(JobEvent.seq).where(JobEvent.job_id == job_id)))
    assert left == {*young_events, *unfanned, recent_seq}
    assert not left & set(old_events)
    assert count(scratch_db, WebhookDelivery) == 1
    assert count(scratch_db, WebhookAttempt) == 2  # the attempts went with their deliveries
    assert count(scratch_db, OutboxMessage, OutboxMessage.published_at.is_(None)) == 4
    assert count(scratch_db, OutboxMessage) == 9


def test_an_event_is_kept_until_its_delivery_has_ended_and_aged(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), "http://127.0.0.1:9/hook")
        [terminal] = seed_events(s, job, 1, age=OLD, type="job.succeeded")
        delivery_id = seed_delivery(s, job, terminal, status="pending", age=OLD, attempts=9)
    p = pruner(scratch_db, scratch_db_url)
    p.step(budget=60)
    assert (
        count(scratch_db, JobEvent) == 1 and count(scratch_db, WebhookDelivery) == 1
    )  # still being delivered

    def finish(age: timedelta) -> None:
        with scratch_db() as s, s.begin():
            s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(status="exhausted", next_attempt_at=None, updated_at=utcnow() - age)
            )

    finish(timedelta(hours=1))
    p.step(budget=60)
    assert (
        count(scratch_db, JobEvent) == 1 and count(scratch_db, WebhookDelivery) == 1
    )  # ended, not aged: replayable
    finish(OLD)
    p.step(budget=60)
    assert (
        count(scratch_db, JobEvent) == 0
        and count(scratch_db, WebhookDelivery) == 0
        and count(scratch_db, WebhookAttempt) == 0
    )


def test_the_events_walk_waits_at_an_event_not_fanned_out_yet(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), None)
        before = seed_events(s, job, 50, age=OLD)
        held = seed_events(s, job, 3, age=OLD, fanned_out=False)
        after = seed_events(s, job, 50, age=OLD)
    p = pruner(scratch_db, scratch_db_url)
    p.step(budget=60)
    with scratch_db() as s:
        assert set(s.scalars(select(JobEvent.seq))) == {*held, *after}
        s.execute(update(JobEvent).values(fanned_out=True))  # the dispatcher fans them out
        s.commit()
    p.step(budget=60)
    assert count(scratch_db, JobEvent) == 0 and before


def test_retention_zero_keeps_forever(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), "http://127.0.0.1:9/hook")
        seed_events(s, job, 10, age=OLD)
        seed_outbox(s, job, 10, published=OLD, age=OLD)
    p = pruner(
        scratch_db,
        scratch_db_url,
        event_retention_days=0,
        outbox_retention_hours=0,
        delivery_retention_days=0,
    )
    assert p.step(budget=60) is False
    assert count(scratch_db, JobEvent) == 10 and count(scratch_db, OutboxMessage) == 10


def test_pruners_side_by_side(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), "http://127.0.0.1:9/hook")
        seed_events(s, job, 3000, age=OLD)
        for seq in seed_events(s, job, 300, age=OLD, type="job.succeeded"):
            seed_delivery(s, job, seq, status="succeeded", age=OLD)
        seed_outbox(s, job, 3000, published=OLD, age=OLD)
        seed_events(s, job, 7, age=timedelta(0))
    errors: list[BaseException] = []

    def run(p: Pruner) -> None:
        try:
            while p.step(budget=0.05):
                pass
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(pruner(scratch_db, scratch_db_url),)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert count(scratch_db, JobEvent) == 7
    assert count(scratch_db, WebhookDelivery) == 0 and count(scratch_db, OutboxMessage) == 0


@pytest.fixture(params=["file", "s3"])
def where(request, tmp_path, monkeypatch) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Storage settings: a directory, or a bucket on the moto S3 server."""
    if request.param == "file":
        return {"storage_url": (tmp_path / "storage").as_uri()}
    endpoint = request.getfixturevalue("s3_endpoint")
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(key, value)
    bucket = f"ttl-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"storage_url": f"s3://{bucket}/outputs", "s3_endpoint_url": endpoint}


def store_outputs(scratch_db, storage: Any, finished_ago: timedelta, n: int) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), None)
        job.status, job.finished_at = "succeeded", utcnow() - finished_ago
        uris = [storage.put(f"jobs/{job.id}/outputs/{i}.png", b"png%d" % i, "image/png") for i in range(n)]
        for i, uri in enumerate(uris):
            s.add(
                JobOutput(
                    job_id=job.id,
                    index=i,
                    uri=uri,
                    content_type="image/png",
                    width=8,
                    height=8,
                    seed=1,
                    sha256="0" * 64,
                    size_bytes=4,
                )
            )
        return job.id, uris


def test_output_ttl_removes_files_then_rows(scratch_db, scratch_db_url, where) -> None:  # type: ignore[no-untyped-def]
    storage = open_storage(make_settings(scratch_db_url, **where))
    old_job, old_uris = store_outputs(scratch_db, storage, OLD, 3)
    new_job, new_uris = store_outputs(scratch_db, storage, timedelta(days=1), 2)

    pruner(scratch_db, scratch_db_url, **where).step(budget=60)  # OUTPUT_RETENTION_DAYS=0: off
    assert count(scratch_db, JobOutput) == 5 and storage.get(old_uris[0]) == b"png0"

    pruner(scratch_db, scratch_db_url, output_retention_days=7, **where).step(budget=60)
    for uri in old_uris:
        with pytest.raises(NotFound):
            storage.get(uri)
    assert [storage.get(u) for u in new_uris] == [b"png0", b"png1"]
    assert count(scratch_db, JobOutput, JobOutput.job_id == old_job) == 0
    assert count(scratch_db, JobOutput, JobOutput.job_id == new_job) == 2
    with scratch_db() as s:
        assert s.get(Job, old_job).outputs_expired_at is not None
        assert s.get(Job, new_job).outputs_expired_at is None


def _set_retention(scratch_db, job_id: str, days: float) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        s.get(Tenant, s.get(Job, job_id).tenant_id).output_retention_days = days


def test_a_tenants_own_retention_overrides_the_setting(scratch_db, scratch_db_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    where = {"storage_url": (tmp_path / "storage").as_uri()}
    storage = open_storage(make_settings(scratch_db_url, **where))
    short, short_uris = store_outputs(scratch_db, storage, timedelta(days=2), 1)  # its tenant: 1 day
    forever, _ = store_outputs(scratch_db, storage, OLD, 1)  # its tenant: 0, kept forever
    default, _ = store_outputs(scratch_db, storage, timedelta(days=2), 1)  # the setting: 7 days
    _set_retention(scratch_db, short, 1)
    _set_retention(scratch_db, forever, 0)

    pruner(scratch_db, scratch_db_url, **where).step(budget=60)  # the setting off: only `short` goes
    with pytest.raises(NotFound):
        storage.get(short_uris[0])
    assert count(scratch_db, JobOutput) == 2

    pruner(scratch_db, scratch_db_url, output_retention_days=7, **where).step(budget=60)
    assert count(scratch_db, JobOutput, JobOutput.job_id == forever) == 1
    assert count(scratch_db, JobOutput, JobOutput.job_id == default) == 1
    pruner(scratch_db, scratch_db_url, output_retention_days=1, **where).step(budget=60)
    assert count(scratch_db, JobOutput, JobOutput.job_id == forever) == 1
    assert count(scratch_db, JobOutput, JobOutput.job_id == default) == 0


def test_the_dispatcher_prunes_on_its_interval(scratch_db, scratch_db_url) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), None)
        seed_events(s, job, 250, age=OLD)
        seed_outbox(s, job, 250, published=OLD, age=OLD)
    stop = threading.Event()
    d = Dispatcher(make_settings(scratch_db_url, prune_batch_size=BATCH, prune_interval=0.2), scratch_db)
    thread = threading.Thread(target=d.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(
            lambda: count(scratch_db, JobEvent) == 0 and count(scratch_db, OutboxMessage) == 0,
            10,
            what="the state this test expects",
        )
        with scratch_db() as s, s.begin():  # new old rows appear: the next pass, one interval on, takes them
            seed_events(s, job, 5, age=OLD)
        assert wait_for(lambda: count(scratch_db, JobEvent) == 0, 5, what="the state this test expects")
    finally:
        stop.set()
        thread.join()
        d.close()


def test_embedded_sqlite_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    migrate(url)
    engine = make_database(url)
    scratch_db = make_session_factory(engine)
    with scratch_db() as s, s.begin():
        job = add_job(s, add_tenant(s), "http://127.0.0.1:9/hook")
        seed_events(s, job, 120, age=OLD)
        for seq in seed_events(s, job, 30, age=OLD, type="job.succeeded"):
            seed_delivery(s, job, seq, status="succeeded", age=OLD)
        seed_outbox(s, job, 120, published=OLD, age=OLD)
        young = seed_events(s, job, 2, age=timedelta(0))
    settings = make_settings(url, prune_batch_size=50)
    assert Pruner(settings, scratch_db.begin, skip_locked=False).step(budget=60) is False
    with scratch_db() as s:
        assert list(s.scalars(select(JobEvent.seq))) == young
    assert count(scratch_db, WebhookDelivery) == 0 and count(scratch_db, WebhookAttempt) == 0
    assert count(scratch_db, OutboxMessage) == 0
    engine.dispose()
