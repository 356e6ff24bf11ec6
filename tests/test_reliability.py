"""Nothing lost: a job accepted while the broker is down is published when it returns; a worker
killed with SIGKILL mid-job leaves the job to be finished, once, by the next worker."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from inference_server.db import JobEvent, JobOutput, OutboxMessage
from tests.support.jobs import get, submit, wait_done
from tests.support.system import ROOT, start_worker
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a harbour at night", "width": 64, "height": 64, "steps": 4, "seed": 3}


def test_broker_down_at_submit_then_published(settings, scratch_db_url, scratch_db):
    """On a database of its own, so the running system's relay cannot publish the row first."""
    from api.app import create_app
    from api.auth import create_tenant_key
    from inference_server.publish.relay import Relay

    with scratch_db() as session:
        _, key = create_tenant_key(session, "outbox")
    down = settings.model_copy(
        update={"database_url": scratch_db_url, "broker_url": "amqp://guest:guest@127.0.0.1:1//"}
    )
    with TestClient(create_app(down)) as client:
        resp = client.post("/v1/jobs", json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert client.get("/readyz").status_code == 503
        time.sleep(0.5)  # the app's relay keeps failing meanwhile; nothing is lost
    assert not _published(scratch_db, job_id)
    # The broker "returns": a relay on the real broker publishes the backlog, confirmed by RabbitMQ.
    relay = Relay.from_settings(scratch_db, settings)
    # (The down app's relay thread may still hold the row for a moment: SKIP LOCKED passes it by.)
    wait_for(lambda: relay.publish_pending() == 1, 30, interval=0.2, what="the relay to publish")
    assert _published(scratch_db, job_id)


def test_outbox_message_reaches_a_worker(api_client, worker):
    """The other half: what the relay publishes is what a worker runs."""
    assert wait_done(api_client, submit(api_client, BODY)["id"])["status"] == "succeeded"


def _published(session_factory, job_id: str) -> bool:
    with session_factory() as session:
        return (
            session.scalar(select(OutboxMessage.published_at).where(OutboxMessage.job_id == job_id))
            is not None
        )


def test_worker_sigkill_mid_job_then_job_succeeds_once(
    api_client, worker, dispatcher, system_env, logs_dir, system_db
):
    """The killed run's message was acknowledged as it started: its lease expires, and the
    dispatcher's reconciler queues the job again for the replacement worker."""
    job = submit(api_client, {**BODY, "steps": 40, "width": 256, "height": 256, "seed": 11})

    def mid_job():
        current = get(api_client, job["id"])
        return current["status"] == "running" and current["progress"]["step"] >= 2

    wait_for(mid_job, 90, what="the job to be mid-run")
    worker.kill(9)  # master and child, no chance to ack or clean up
    assert get(api_client, job["id"])["status"] == "running"
    replacement = start_worker(dict(system_env, API_URL=api_client.base_url), logs_dir)
    # Later tests use the new worker.
    worker.proc, worker.log, worker.metrics_url = replacement.proc, replacement.log, replacement.metrics_url

    done = wait_done(api_client, job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    with system_db() as session:
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
    assert again["id"] != job["id"]  # two runs compared, not one record with itself
    assert again["outputs"][0]["sha256"] == done["outputs"][0]["sha256"]


def test_a_second_worker_under_the_same_name_is_refused_plainly(worker, system_env, logs_dir):
    """Same families and device on one host: the same Celery node name, whose control queue the
    running worker holds. The second one says so and exits instead of dying on RESOURCE_LOCKED."""
    import subprocess
    import sys

    second = subprocess.run(
        [sys.executable, "-m", "inference_server.cli.main", "worker"]
        + ["--families", "sd15,sdxl,flux,qwen-image-edit", "--device", "cpu"],
        env=system_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1
    assert "worker_running" in second.stderr and "already running" in second.stderr
    assert worker.proc.poll() is None  # the running worker is untouched
