"""A job's end of life against the running system (API, worker, dispatcher, PostgreSQL, RabbitMQ,
the moto S3 server): `DELETE /v1/jobs/{id}` removes its objects from the bucket and its rows,
keeping a tombstone; output retention deletes outputs and marks the job, downloads answer 410."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
import requests
from PIL import Image
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.auth import create_tenant_key
from inference_server.db import DeletedJob, Job, JobEvent, JobOutput
from inference_server.db.base import utcnow
from tests.support.jobs import data_uri, get, output_bytes, submit, wait_done
from tests.support.system import Proc, cli
from tests.support.waiting import wait_for

BODY = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 3}


def _objects(system_env: dict[str, str], job_id: str) -> list[str]:
    """The keys the job has in the system's bucket, read from the S3 server itself."""
    url = urlparse(system_env["STORAGE_URL"])
    s3 = boto3.client("s3", endpoint_url=system_env["S3_ENDPOINT_URL"], region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=url.netloc, Prefix=f"{url.path.strip('/')}/jobs/{job_id}/")
    return [o["Key"] for o in listed.get("Contents", [])]


def _rows(system_db: sessionmaker[Session], job_id: str) -> dict[str, int]:
    tables = {
        "jobs": Job.id,
        "outputs": JobOutput.job_id,
        "events": JobEvent.job_id,
        "tombstones": DeletedJob.id,
    }
    with system_db() as s:
        return {name: s.scalar(select(func.count()).where(c == job_id)) or 0 for name, c in tables.items()}


@pytest.fixture
def stranger(api_server: str, system_db: sessionmaker[Session]) -> requests.Session:
    with system_db() as session:
        _, key = create_tenant_key(session, f"stranger-{uuid.uuid4().hex[:8]}")
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    http.base_url = api_server  # type: ignore[attr-defined]
    return http


def test_delete_removes_outputs_inputs_and_rows(api_client, stranger, worker, system_db, system_env) -> None:  # type: ignore[no-untyped-def]
    body = {**BODY, "task": "img2img", "image": data_uri(Image.new("RGB", (64, 64), "teal")), "num_images": 2}
    job = wait_done(api_client, submit(api_client, body)["id"])
    assert job["status"] == "succeeded", job
    keys = _objects(system_env, job["id"])
    assert len([k for k in keys if "/outputs/" in k]) == 2 and any("/inputs/" in k for k in keys), keys
    url = f"{api_client.base_url}/v1/jobs/{job['id']}"

    refused = stranger.delete(f"{stranger.base_url}/v1/jobs/{job['id']}", timeout=30)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "job_not_found"
    assert len(_objects(system_env, job["id"])) == len(keys)  # another tenant's DELETE touched nothing

    assert api_client.delete(url, timeout=30).status_code == 204
    assert _objects(system_env, job["id"]) == []
    assert _rows(system_db, job["id"]) == {"jobs": 0, "outputs": 0, "events": 0, "tombstones": 1}
    gone = api_client.get(url, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_deleted"
    assert api_client.delete(url, timeout=30).status_code == 204  # idempotent
    # The tombstone is the tenant's own: to anyone else the id is unknown.
    other = stranger.get(f"{stranger.base_url}/v1/jobs/{job['id']}", timeout=30)
    assert other.json()["error"]["code"] == "job_not_found"
    listed = api_client.get(f"{api_client.base_url}/v1/jobs", timeout=30).json()["jobs"]
    assert job["id"] not in [j["id"] for j in listed]


def test_delete_cancels_a_running_job_and_leaves_nothing(api_client, worker, system_db, system_env) -> None:  # type: ignore[no-untyped-def]
    job = submit(api_client, {**BODY, "steps": 40})
    wait_for(lambda: get(api_client, job["id"])["status"] == "running", 60, what="the job to run")
    assert api_client.delete(f"{api_client.base_url}/v1/jobs/{job['id']}", timeout=30).status_code == 204
    assert _rows(system_db, job["id"]) == {"jobs": 0, "outputs": 0, "events": 0, "tombstones": 1}
    # The worker stops at its next step (the cancel's NOTIFY); whatever it may have uploaded goes too.
    wait_for(lambda: f"job {job['id']}" not in _running(system_db), 30, what="the worker to let go")
    follow = submit(api_client, BODY)  # the worker is free for the next job
    assert wait_done(api_client, follow["id"])["status"] == "succeeded"
    assert _objects(system_env, job["id"]) == []


def _running(system_db: sessionmaker[Session]) -> str:
    with system_db() as s:
        return " ".join(f"job {i}" for i in s.scalars(select(Job.id).where(Job.status == "running")))


def test_outputs_expire_after_the_tenants_retention(  # type: ignore[no-untyped-def]
    api_client, tenant, worker, system_db, system_env, logs_dir: Path
) -> None:
    job = wait_done(api_client, submit(api_client, BODY)["id"])
    assert job["status"] == "succeeded" and job["outputs_expired"] is False
    assert output_bytes(api_client, job["id"]).status_code == 200
    assert _objects(system_env, job["id"])

    name = tenant.tenant.name
    done = cli("tenants", "set", "--tenant", name, "--output-retention-days", "1", env=system_env)
    assert done.returncode == 0, done.stderr
    with system_db() as s, s.begin():  # the job finished two days ago
        s.execute(update(Job).where(Job.id == job["id"]).values(finished_at=utcnow() - timedelta(days=2)))
    pruning = Proc("dispatcher-retention", ["dispatcher"], dict(system_env, PRUNE_INTERVAL="0.3"), logs_dir)
    try:
        expired = wait_for(
            lambda: (j := get(api_client, job["id"]))["outputs_expired"] and j, 60, what="outputs to expire"
        )
    finally:
        pruning.kill(15)
    assert expired["outputs"] == [] and expired["status"] == "succeeded"
    assert _objects(system_env, job["id"]) == []
    download = api_client.get(f"{api_client.base_url}/v1/jobs/{job['id']}/outputs/0", timeout=30)
    assert download.status_code == 410 and download.json()["error"]["code"] == "output_expired"


def test_a_deleted_jobs_webhook_is_not_sent_again(  # type: ignore[no-untyped-def]
    api_client, worker, dispatcher, receiver
) -> None:
    receiver.behaviour = lambda n, request: (500, {}, 0.0)  # every attempt fails: retries are due
    job = submit(api_client, {**BODY, "webhook": {"url": receiver.url, "events": ["job.succeeded"]}})
    wait_for(lambda: receiver.types(job["id"]), 60, what="the first webhook attempt")
    assert api_client.delete(f"{api_client.base_url}/v1/jobs/{job['id']}", timeout=30).status_code == 204
    sent = len(receiver.events(job["id"]))
    time.sleep(3.0)  # six times WEBHOOK_RETRY_DELAYS' 0.5 s: retries would have come by now
    assert len(receiver.events(job["id"])) <= sent + 1  # at most the attempt already in flight
