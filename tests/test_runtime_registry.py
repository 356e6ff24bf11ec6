"""Models and LoRAs managed at runtime, against the running system (API, worker, PostgreSQL,
RabbitMQ, moto S3): nothing is restarted between adding an entry and a job using it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.auth import create_tenant_key
from inference_server.db.registry_tables import WorkerModel
from tests.support.jobs import submit, wait_done
from tests.support.system import ROOT, Proc, start_api
from tests.support.waiting import wait_for


def _client(api_server: str, key: str) -> requests.Session:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    http.base_url = api_server  # type: ignore[attr-defined]
    return http


@pytest.fixture
def other(api_server: str, system_db: sessionmaker[Session]) -> requests.Session:
    """A second tenant's client."""
    with system_db() as session:
        _, key = create_tenant_key(session, f"other-{uuid.uuid4().hex[:8]}")
    return _client(api_server, key)


@pytest.fixture
def admin(api_server: str, system_db: sessionmaker[Session]) -> requests.Session:
    """A client with an admin key, made with the CLI as an operator would."""
    out = subprocess.run(
        [sys.executable, "-m", "inference_server.cli.main", "keys", "create", "--tenant", "ops", "--admin"],
        env=_system_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["admin"] is True
    return _client(api_server, made["api_key"])


_system_env: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _env(system_env: dict[str, str]) -> None:
    _system_env.update(system_env)


def _upload_model(system_env: dict[str, str], folder: Path) -> str:
    """Copy a diffusers folder to the system's bucket; its s3:// URI."""
    bucket = system_env["STORAGE_URL"].split("/")[2]
    prefix = f"models/{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=system_env["S3_ENDPOINT_URL"], region_name="us-east-1")
    for path in folder.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{bucket}/{prefix}"


def _add_model(http: requests.Session, model_id: str, source: str, **extra: Any) -> dict[str, Any]:
    body = {"family": "sd15", "id": model_id, "source": source, **extra}
    resp = http.post(f"{http.base_url}/v1/models", json=body, timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 201, resp.text
    return resp.json()


def _code(resp: requests.Response) -> str:
    return str(resp.json()["error"]["code"])


def _job(
    model: str | None = None, loras: list[dict[str, Any]] | None = None, steps: int = 2
) -> dict[str, Any]:
    body: dict[str, Any] = {"family": "sd15", "task": "txt2img", "prompt": "a cat", "steps": steps, "seed": 5}
    if model:
        body["model"] = model
    if loras:
        body["loras"] = loras
    return body


def _loaded(system_db: sessionmaker[Session], model_id: str) -> list[str]:
    with system_db() as session:
        return list(session.scalars(select(WorkerModel.worker).where(WorkerModel.model_id == model_id)))


def test_a_model_added_from_s3_runs_jobs_and_stays_private(
    api_client: requests.Session,
    other: requests.Session,
    worker: Proc,
    system_env: dict[str, str],
    tiny_models: Path,
    system_db: sessionmaker[Session],
) -> None:
    model_id = f"rt-{uuid.uuid4().hex[:6]}"
    source = _upload_model(system_env, tiny_models.parent / "sd15")
    added = _add_model(api_client, model_id, source, defaults={"steps": 3})
    assert added["shared"] is False and added["source"] == source

    job = wait_done(api_client, submit(api_client, _job(model_id))["id"])
    assert job["status"] == "succeeded", job
    assert job["model"] == model_id and job["outputs"]
    catalog = api_client.get(f"{api_client.base_url}/v1/models", timeout=30).json()  # type: ignore[attr-defined]
    [sd15] = [f for f in catalog["families"] if f["name"] == "sd15"]
    assert model_id in [m["id"] for m in sd15["models"]]
    shown = api_client.get(f"{api_client.base_url}/v1/models/sd15/{model_id}", timeout=30).json()  # type: ignore[attr-defined]
    assert [w["worker"] for w in shown["workers"]] == _loaded(system_db, model_id) != []

    # Another tenant neither sees it nor can use or delete it.
    theirs = other.get(f"{other.base_url}/v1/models", timeout=30).json()  # type: ignore[attr-defined]
    assert model_id not in [m["id"] for f in theirs["families"] for m in f["models"]]
    for method in ("get", "delete"):
        resp = getattr(other, method)(f"{other.base_url}/v1/models/sd15/{model_id}", timeout=30)  # type: ignore[attr-defined]
        assert resp.status_code == 404 and _code(resp) == "model_not_found", resp.text
    resp = other.post(f"{other.base_url}/v1/jobs", json=_job(model_id), timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 400 and _code(resp) == "unknown_model"

    # Deleted with nothing queued: the worker evicts it within its poll.
    resp = api_client.delete(f"{api_client.base_url}/v1/models/sd15/{model_id}", timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    wait_for(lambda: not _loaded(system_db, model_id), 15, what="the worker to evict the deleted model")
    resp = api_client.post(f"{api_client.base_url}/v1/jobs", json=_job(model_id), timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 400 and _code(resp) == "unknown_model"


def test_delete_refuses_while_jobs_wait_and_force_fails_them(
    api_client: requests.Session, worker: Proc, tiny_models: Path
) -> None:
    model_id = f"rt-{uuid.uuid4().hex[:6]}"
    _add_model(api_client, model_id, f"file://{tiny_models.parent / 'sd15'}")
    url = f"{api_client.base_url}/v1/models/sd15/{model_id}"  # type: ignore[attr-defined]
    # The first runs long enough (50 steps) for the second to be still queued behind it.
    jobs = [submit(api_client, _job(model_id, steps=50))["id"] for _ in range(2)]
    resp = api_client.delete(url, timeout=30)
    assert resp.status_code == 409 and _code(resp) == "model_busy", resp.text
    resp = api_client.delete(url, params={"force": "true"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["failed_jobs"]) <= set(jobs) and resp.json()["failed_jobs"]
    for job_id in jobs:
        job = wait_done(api_client, job_id)
        if job_id in resp.json()["failed_jobs"]:
            assert job["status"] == "failed" and job["error"]["code"] == "model_deleted", job
    assert api_client.get(url, timeout=30).status_code == 404


def _lora_file(tiny_models: Path, family: str) -> bytes:
    return (
        tiny_models.parent / "loras" / f"{family}-style" / "pytorch_lora_weights.safetensors"
    ).read_bytes()


def _upload_lora(http: requests.Session, name: str, family: str, data: bytes) -> requests.Response:
    return http.post(
        f"{http.base_url}/v1/loras",  # type: ignore[attr-defined]
        data={"name": name, "family": family},
        files={"file": ("style.safetensors", data, "application/octet-stream")},
        timeout=30,
    )


def test_an_uploaded_lora_is_used_then_refused_once_deleted(
    api_client: requests.Session,
    other: requests.Session,
    worker: Proc,
    tiny_models: Path,
    system_env: dict[str, str],
) -> None:
    name = f"style-{uuid.uuid4().hex[:6]}"
    resp = _upload_lora(api_client, name, "sd15", _lora_file(tiny_models, "sd15"))
    assert resp.status_code == 201, resp.text
    stored = resp.json()
    assert stored["family"] == "sd15" and stored["source"].startswith("s3://")
    listed = api_client.get(f"{api_client.base_url}/v1/loras", params={"family": "sd15"}, timeout=30).json()  # type: ignore[attr-defined]
    assert name in [lo["name"] for lo in listed["loras"]]

    plain = wait_done(api_client, submit(api_client, _job())["id"])
    styled = wait_done(api_client, submit(api_client, _job(loras=[{"name": name, "scale": 1.0}]))["id"])
    assert styled["status"] == "succeeded", styled
    assert styled["outputs"][0]["sha256"] != plain["outputs"][0]["sha256"]  # the LoRA changed the image
    assert worker.metrics_url is not None
    metrics = requests.get(worker.metrics_url, timeout=10).text
    assert 'inference_lora_switch_seconds_count{family="sd15"}' in metrics  # the switch is reported

    # Another tenant cannot see, use or delete it.
    for method in ("get", "delete"):
        resp = getattr(other, method)(f"{other.base_url}/v1/loras/{name}", timeout=30)  # type: ignore[attr-defined]
        assert resp.status_code == 404 and _code(resp) == "lora_not_found"
    resp = other.post(f"{other.base_url}/v1/jobs", json=_job(loras=[{"name": name}]), timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 400 and _code(resp) == "unknown_lora"

    resp = api_client.delete(f"{api_client.base_url}/v1/loras/{name}", timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    resp = api_client.post(f"{api_client.base_url}/v1/jobs", json=_job(loras=[{"name": name}]), timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 400 and _code(resp) == "unknown_lora"
    bucket, key = stored["source"][5:].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=system_env["S3_ENDPOINT_URL"], region_name="us-east-1")
    assert s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount") == 0  # the file is gone too


def test_bad_lora_uploads_are_refused_with_a_code(api_client: requests.Session, tiny_models: Path) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    cases = [
        ("sd15", b"this is not a safetensors file", 400, "invalid_lora"),
        ("sd15", _lora_file(tiny_models, "sd15")[:200], 400, "invalid_lora"),  # cut short
        ("sd15", _lora_file(tiny_models, "flux"), 400, "lora_family_mismatch"),  # a transformer LoRA
        ("flux", _lora_file(tiny_models, "qwen-image-edit"), 400, "lora_family_mismatch"),  # other layers
        ("nope", _lora_file(tiny_models, "sd15"), 400, "unknown_family"),
    ]
    for family, data, status, code in cases:
        resp = _upload_lora(api_client, name, family, data)
        assert resp.status_code == status and _code(resp) == code, (family, code, resp.text)
    resp = api_client.post(
        f"{api_client.base_url}/v1/models",  # type: ignore[attr-defined]
        json={"family": "sd15", "id": name, "source": "https://example.com/model"},  # not an archive
        timeout=30,
    )
    assert resp.status_code == 400 and _code(resp) == "unsupported_model_source"
    resp = api_client.post(
        f"{api_client.base_url}/v1/models",  # type: ignore[attr-defined]
        json={"family": "sd15", "id": "tiny-sd15", "source": "file:///x"},
        timeout=30,
    )
    assert resp.status_code == 409 and _code(resp) == "model_exists"


def test_admin_keys_manage_shared_entries_and_placement(
    api_client: requests.Session,
    admin: requests.Session,
    worker: Proc,
    tiny_models: Path,
    system_db: sessionmaker[Session],
) -> None:
    model_id = f"shared-{uuid.uuid4().hex[:6]}"
    added = _add_model(admin, model_id, f"file://{tiny_models.parent / 'sd15'}")
    assert added["shared"] is True
    url = f"/v1/models/sd15/{model_id}"
    assert api_client.get(f"{api_client.base_url}{url}", timeout=30).status_code == 200  # type: ignore[attr-defined]
    for method, path in (("delete", url), ("post", f"{url}/load")):
        resp = getattr(api_client, method)(f"{api_client.base_url}{path}", timeout=30)  # type: ignore[attr-defined]
        assert resp.status_code == 403 and _code(resp) == "admin_required", resp.text

    resp = admin.post(f"{admin.base_url}{url}/load", params={"timeout": 60}, timeout=90)  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["complete"] is True and [w["status"] for w in body["workers"]] == ["loaded"], body
    assert body["workers"][0]["seconds"] > 0
    shown = admin.get(f"{admin.base_url}{url}", timeout=30).json()  # type: ignore[attr-defined]
    assert [w["worker"] for w in shown["workers"]] == [body["workers"][0]["worker"]]

    resp = admin.post(f"{admin.base_url}{url}/unload", params={"timeout": 60}, timeout=90)  # type: ignore[attr-defined]
    assert resp.status_code == 200 and [w["status"] for w in resp.json()["workers"]] == ["unloaded"], (
        resp.text
    )
    assert admin.get(f"{admin.base_url}{url}", timeout=30).json()["workers"] == []  # type: ignore[attr-defined]
    assert admin.delete(f"{admin.base_url}{url}", timeout=30).status_code == 200  # type: ignore[attr-defined]


def test_another_api_process_accepts_a_model_added_a_moment_ago(
    api_client: requests.Session,
    system_env: dict[str, str],
    logs_dir: Path,
    tiny_models: Path,
    tenant: Any,
    worker: Proc,
) -> None:
    """An API replica that read the registry a moment ago, and would not read it again for a
    minute, reads it again when a submit names a model it does not know."""
    proc, url = start_api(dict(system_env, REGISTRY_POLL_INTERVAL="60"), logs_dir, name="api-replica")
    try:
        replica = _client(url, tenant.api_key)
        assert replica.get(f"{url}/v1/models", timeout=30).status_code == 200  # its registry is read now
        model_id = f"rt-{uuid.uuid4().hex[:6]}"
        _add_model(api_client, model_id, f"file://{tiny_models.parent / 'sd15'}")
        resp = replica.post(f"{url}/v1/jobs", json=_job(model_id), timeout=30)
        assert resp.status_code == 202, resp.text
        wait_done(api_client, resp.json()["id"])  # whoever runs it, it does not linger for later tests
    finally:
        proc.kill(15)
