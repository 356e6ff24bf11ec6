"""The AMQP ingress through the running system, with real pika clients on the suite's vhost: a job
published to ``inference.requests`` runs and its events come back on ``reply_to``; ``message_id``
keeps a repeat to one job; refused messages land on the dead-letter queue with their reason and an
error reply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from inference_server.db import Job
from tests.support.amqp import DEAD_QUEUE, Amqp, counter, start_ingress
from tests.support.system import ROOT
from tests.support.waiting import wait_for
from webhooks import verify

BODY = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def ingress(system_env, logs_dir, api_server, worker, dispatcher) -> Iterator:  # type: ignore[no-untyped-def]
    proc = start_ingress(dict(system_env, API_URL=api_server), logs_dir)
    yield proc
    proc.kill(15)


@pytest.fixture
def amqp(broker_url: str) -> Iterator[Amqp]:
    client = Amqp.open(broker_url)
    yield client
    client.close()


def _replies(amqp: Amqp, queue: str, until: str, timeout: float = 60) -> list:  # type: ignore[type-arg]
    got: list = []  # type: ignore[type-arg]

    def arrived() -> bool:
        got.extend(amqp.take(queue))
        return any(p.type == until for p, _ in got)

    wait_for(arrived, timeout, what=f"a {until} reply on {queue}")
    return got


def _jobs_with_key(system_db, key: str) -> int:  # type: ignore[no-untyped-def]
    with system_db() as session:
        return int(
            session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == key)) or 0
        )


def _dead_letter(amqp: Amqp, message_id: str) -> tuple:  # type: ignore[type-arg]
    found: list = []  # type: ignore[type-arg]

    def there() -> bool:
        found.extend(m for m in amqp.take(DEAD_QUEUE) if m[0].message_id == message_id)
        return bool(found)

    wait_for(there, 20, what=f"message {message_id} on {DEAD_QUEUE}")
    return found[0]


def test_a_published_job_runs_and_every_event_comes_back_signed_on_reply_to(  # type: ignore[no-untyped-def]
    ingress, amqp, tenant, system_db
):
    queue = amqp.reply_queue()
    message_id = f"gen-{uuid.uuid4().hex}"
    amqp.submit(BODY, api_key=tenant.api_key, message_id=message_id, reply_to=queue, correlation_id="corr-1")
    replies = _replies(amqp, queue, "job.succeeded")
    types = [p.type for p, _ in replies]
    assert types[0] == "job.queued" and types[-1] == "job.succeeded" and "job.started" in types, types
    for properties, body in replies:
        assert properties.correlation_id == "corr-1"
        assert properties.delivery_mode == 2
        headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in properties.headers.items()}
        assert headers["webhook-id"] == properties.message_id
        event = verify(body, headers, tenant.webhook_secret)  # the webhook body, signed the same way
        assert event["type"] == properties.type
    final = json.loads(replies[-1][1])["data"]
    assert final["status"] == "succeeded" and final["outputs"][0]["url"].startswith("http")
    with system_db() as session:
        job = session.scalar(select(Job).where(Job.idempotency_key == message_id))
        assert job is not None and job.id == final["id"] and job.reply_to == queue


def test_the_events_header_limits_the_replies(ingress, amqp, tenant):  # type: ignore[no-untyped-def]
    queue = amqp.reply_queue()
    amqp.submit(
        BODY,
        api_key=tenant.api_key,
        message_id=uuid.uuid4().hex,
        reply_to=queue,
        headers={"events": "succeeded,failed"},
    )
    replies = _replies(amqp, queue, "job.succeeded")
    assert [p.type for p, _ in replies] == ["job.succeeded"]


def test_the_same_message_id_twice_gives_one_job(ingress, amqp, tenant, system_db):  # type: ignore[no-untyped-def]
    message_id = uuid.uuid4().hex
    replayed = counter(ingress, "inference_ingress_messages_total", outcome="replayed")
    amqp.submit(BODY, api_key=tenant.api_key, message_id=message_id)
    amqp.submit(BODY, api_key=tenant.api_key, message_id=message_id)
    wait_for(
        lambda: counter(ingress, "inference_ingress_messages_total", outcome="replayed") >= replayed + 1,
        20,
        what="the second message taken as a replay",
    )
    assert _jobs_with_key(system_db, message_id) == 1


def test_an_invalid_message_is_dead_lettered_with_its_reason_and_an_error_reply(
    ingress, amqp, tenant, system_db
):  # type: ignore[no-untyped-def]
    queue = amqp.reply_queue()
    message_id = uuid.uuid4().hex
    amqp.submit(
        {**BODY, "steps": 9999},
        api_key=tenant.api_key,
        message_id=message_id,
        reply_to=queue,
        correlation_id="c-9",
    )
    properties, body = _dead_letter(amqp, message_id)
    assert properties.headers["x-error-code"] == "validation_error"
    assert "steps" in properties.headers["x-error-message"]
    assert "authorization" not in properties.headers  # the API key is not copied to the dead letters
    assert json.loads(body)["steps"] == 9999  # the original body, as published
    [(reply, raw)] = _replies(amqp, queue, "error", timeout=10)
    assert reply.correlation_id == "c-9"
    assert json.loads(raw)["error"]["code"] == "validation_error"
    assert _jobs_with_key(system_db, message_id) == 0


@pytest.mark.parametrize(
    ("api_key", "body", "message_id", "code"),
    [
        ("isk_not-a-key", BODY, "m", "invalid_api_key"),
        (None, BODY, "m", "missing_api_key"),
        ("valid", BODY, None, "missing_message_id"),
        ("valid", b"not json", "m", "invalid_message"),
        ("valid", {**BODY, "family": "nope"}, "m", "unknown_family"),
    ],
)
def test_a_refused_message_carries_its_code_in_the_dead_letter_and_the_reply(  # type: ignore[no-untyped-def]
    ingress, amqp, tenant, api_key, body, message_id, code
):
    queue = amqp.reply_queue()
    correlation = uuid.uuid4().hex  # finds the dead letter of a message without a message_id
    key = tenant.api_key if api_key == "valid" else api_key
    mid = f"{message_id}-{correlation}" if message_id else None
    routing = "nope" if isinstance(body, dict) and body["family"] == "nope" else "sd15"
    amqp.submit(
        body, api_key=key, message_id=mid, reply_to=queue, correlation_id=correlation, routing_key=routing
    )
    [(reply, raw)] = _replies(amqp, queue, "error", timeout=20)
    assert reply.correlation_id == correlation
    assert json.loads(raw)["error"]["code"] == code
    found: list = []  # type: ignore[type-arg]

    def dead() -> bool:
        found.extend(m for m in amqp.take(DEAD_QUEUE) if m[0].correlation_id == correlation)
        return bool(found)

    wait_for(dead, 20, what="the dead letter")
    assert found[0][0].headers["x-error-code"] == code
    assert counter(ingress, "inference_ingress_rejected_total", code=code) >= 1


def test_the_example_client_submits_and_waits_for_its_job(ingress, broker_url, tenant):  # type: ignore[no-untyped-def]
    env = dict(os.environ, BROKER_URL=broker_url, INFERENCE_SERVER_API_KEY=tenant.api_key)
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "amqp_client.py"),
            "a lighthouse",
            "--steps",
            "2",
            "--size",
            "64",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("job.queued") and lines[-1].startswith("job.succeeded"), lines
    assert "http" in lines[-1]  # the output URL


def test_a_reply_queue_that_appears_late_gets_every_event_on_the_retry_schedule(  # type: ignore[no-untyped-def]
    ingress, amqp, tenant, system_db, api_client
):
    from webhooks.tables import WebhookDelivery

    queue = f"test.replies.late.{uuid.uuid4().hex[:8]}"  # not declared yet: replies are returned
    message_id = uuid.uuid4().hex
    amqp.submit(BODY, api_key=tenant.api_key, message_id=message_id, reply_to=queue)

    def failed_attempt() -> bool:
        with system_db() as session:
            rows = session.scalars(
                select(WebhookDelivery)
                .join(Job, Job.id == WebhookDelivery.job_id)
                .where(Job.idempotency_key == message_id, WebhookDelivery.kind == "amqp")
            ).all()
            return any(d.attempts >= 1 and "no queue" in (d.last_error or "") for d in rows)

    wait_for(failed_attempt, 30, what="a returned reply recorded as a failed attempt")
    amqp.channel.queue_declare(queue, durable=True)  # the receiver comes back before the retries run out
    replies = _replies(amqp, queue, "job.succeeded")
    assert [p.type for p, _ in replies][0] == "job.queued"  # the failed one, retried, first: in order
    job_id = json.loads(replies[0][1])["data"]["id"]
    log = api_client.get(f"{api_client.base_url}/v1/jobs/{job_id}/webhooks").json()
    assert {(d["url"], d["kind"]) for d in log["deliveries"]} == {(f"amqp:{queue}", "amqp")}  # one log
