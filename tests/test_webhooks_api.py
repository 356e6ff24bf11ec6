"""The webhook endpoints in the real API app (its auth and error mapping), on real PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select

from api.app import create_app
from api.auth import create_tenant_key
from tests.support.receiver import Received
from tests.support.seed import add_event, add_job, make_settings
from tests.support.waiting import wait_for
from webhooks.dispatcher import Dispatcher
from webhooks.metrics import DeliveryBacklogCollector
from webhooks.tables import WebhookDelivery


@pytest.fixture
def app_settings(scratch_db_url, tmp_path):  # type: ignore[no-untyped-def]
    """Settings of an API app and a dispatcher in this process, on the scratch database."""
    return make_settings(
        scratch_db_url,
        webhook_retry_delays=[0.01],
        storage_url=(tmp_path / "storage").as_uri(),
        INFERENCE_SERVER_HOME=str(tmp_path),
    )


def exhausted_count() -> float:
    """The dispatcher's count of exhausted deliveries, as Prometheus scrapes it."""
    return REGISTRY.get_sample_value("inference_webhook_deliveries_total", {"outcome": "exhausted"}) or 0.0


def client_for(settings, key: str) -> TestClient:  # type: ignore[no-untyped-def]
    client = TestClient(create_app(settings, run_relay=False))
    client.headers["Authorization"] = f"Bearer {key}"
    return client


def test_list_and_replay(scratch_db, app_settings, receiver) -> None:  # type: ignore[no-untyped-def]
    receiver.behaviour = lambda n, req: (500 if n < 2 else 200, {}, 0.0)
    with scratch_db() as s:
        tenant, key = create_tenant_key(s, "acme")
        _, other_key = create_tenant_key(s, "other")
    with scratch_db() as s, s.begin():
        job = add_job(s, s.merge(tenant), receiver.url)
        event_id = add_event(s, job, "job.succeeded").id
        job_id = job.id
    d = Dispatcher(app_settings, scratch_db)
    before = exhausted_count()
    d.run_once()
    time.sleep(0.05)  # past the 0.01 s retry delay
    d.run_once()
    assert exhausted_count() == before + 1

    with client_for(app_settings, key) as client:
        body = client.get(f"/v1/jobs/{job_id}/webhooks").json()
        [delivery] = body["deliveries"]
        assert delivery["event_id"] == event_id and delivery["status"] == "exhausted"
        assert delivery["next_attempt_at"] is None and delivery["last_status_code"] == 500
        assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500]
        assert all(a["started_at"] and a["duration_ms"] >= 0 for a in delivery["attempt_log"])

        replayed = client.post(f"/v1/webhooks/deliveries/{delivery['id']}/replay")
        assert replayed.status_code == 202, replayed.text
        assert replayed.json()["status"] == "pending" and replayed.json()["next_attempt_at"]
        d.run_once()
        [delivery] = client.get(f"/v1/jobs/{job_id}/webhooks").json()["deliveries"]
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 3
        assert delivery["delivered_at"] is not None
        assert client.post("/v1/webhooks/deliveries/nope/replay").status_code == 404
        assert client.get("/v1/jobs/nope/webhooks").status_code == 404

    with client_for(app_settings, other_key) as client:  # another tenant sees nothing
        missing = client.get(f"/v1/jobs/{job_id}/webhooks")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.post(f"/v1/webhooks/deliveries/{delivery['id']}/replay").status_code == 404
    d.close()
    assert receiver.ids() == [event_id] * 3


def test_replay_while_sending_is_a_conflict(scratch_db, app_settings, receiver) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def hold(n: int, request: Received) -> tuple[int, dict[str, str], float]:
        release.wait(10)
        return 204, {}, 0.0

    receiver.behaviour = hold
    with scratch_db() as s:
        tenant, key = create_tenant_key(s, "busy")
    with scratch_db() as s, s.begin():
        add_event(s, add_job(s, s.merge(tenant), receiver.url), "job.queued")
    d = Dispatcher(app_settings, scratch_db)
    sending = threading.Thread(target=d.run_once)
    sending.start()
    try:
        wait_for(lambda: receiver.requests, 5, what="the delivery to be on the wire")
        with scratch_db() as s:
            delivery_id = s.scalar(select(WebhookDelivery.id))
        with client_for(app_settings, key) as client:
            answer = client.post(f"/v1/webhooks/deliveries/{delivery_id}/replay")
            assert answer.status_code == 409 and answer.json()["error"]["code"] == "delivery_in_flight"
    finally:
        release.set()
        sending.join()
        d.close()
    with scratch_db() as s:  # the refused replay changed nothing
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None and (row.status, row.attempts) == ("succeeded", 1)


def test_backlog_collector(scratch_db, app_settings) -> None:  # type: ignore[no-untyped-def]
    with scratch_db() as s:
        tenant, _ = create_tenant_key(s, "metrics")
    with scratch_db() as s, s.begin():
        add_event(s, add_job(s, s.merge(tenant), "http://127.0.0.1:9/x"), "job.queued")
    with scratch_db() as s, s.begin():
        from webhooks.fanout import fan_out

        fan_out(s)
    backlog, lag = DeliveryBacklogCollector(scratch_db).collect()
    assert {(x.labels["status"], x.value) for x in backlog.samples} == {
        ("pending", 1),
        ("waiting", 0),
        ("sending", 0),
    }
    assert lag.samples[0].value >= 0
