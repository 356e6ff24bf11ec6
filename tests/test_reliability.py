"""Nothing lost: a job accepted while the broker is down is published when it returns; a worker
killed with SIGKILL mid-job leaves the job to be finished, once, by the next worker."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from inference_server.db import JobEvent, JobOutput, OutboxMessage
from tests.conftest import start_worker, wait_for
from tests.jobs_helpers import get, submit, wait_done

BODY = {"family": "sd15", "prompt": "a harbour at night", "width": 64, "height": 64, "steps": 4, "seed": 3}


def test_broker_down_at_submit_then_published(settings, session_factory, tenant, api_client, worker):
    from api.app import create_app
    from workers.celery_app import create_celery_app
    from workers.relay import Relay

    down = settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:1//"})
    with TestClient(create_app(down)) as client:
        resp = client.post("/v1/jobs", json=BODY, headers={"Authorization": f"Bearer {tenant.api_key}"})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert client.get("/readyz").status_code == 503
    with session_factory() as session:
        row = session.scalar(select(OutboxMessage).where(OutboxMessage.job_id == job_id))
        assert row is not None and row.published_at is None
    # The broker "returns": any relay (here a fresh one on the real broker) publishes the backlog.
    relay = Relay.from_settings(create_celery_app(settings), session_factory, settings)
    wait_for(lambda: relay.publish_pending() >= 0 and _published(session_factory, job_id), 30, what="publish")
    assert wait_done(api_client, job_id)["status"] == "succeeded"


def _published(session_factory, job_id: str) -> bool:
    with session_factory() as session:
        return (
            session.scalar(select(OutboxMessage.published_at).where(OutboxMessage.job_id == job_id))
            is not None
        )


def test_worker_sigkill_mid_job_then_job_succeeds_once(
    api_client, worker, system_env, logs_dir, session_factory
):
    job = submit(api_client, {**BODY, "steps": 40, "width": 256, "height": 256, "seed": 11})

    def mid_job():
        current = get(api_client, job["id"])
        return current["status"] == "running" and current["progress"]["step"] >= 2

    wait_for(mid_job, 90, what="the job to be mid-run")
    worker.kill(9)  # master and child, no chance to ack or clean up
    assert get(api_client, job["id"])["status"] == "running"
    replacement = start_worker(dict(system_env, API_URL=api_client.base_url), logs_dir)
    worker.proc, worker.log = replacement.proc, replacement.log  # later tests use the new worker

    done = wait_done(api_client, job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    with session_factory() as session:
        succeeded = session.scalar(
            select(func.count()).where(JobEvent.job_id == job["id"], JobEvent.type == "job.succeeded")
        )
        outputs = session.scalar(select(func.count()).where(JobOutput.job_id == job["id"]))
    assert succeeded == 1 and outputs == 1
    # The same seed on a clean run gives the same image: the restart left no trace.
    again = wait_done(
        api_client,
        submit(api_client, {**BODY, "steps": 40, "width": 256, "height": 256, "seed": 11})["id"],
        timeout=180,
    )
    assert again["outputs"][0]["sha256"] == done["outputs"][0]["sha256"]
    assert uuid.UUID(job["id"])
