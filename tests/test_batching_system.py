"""Cross-request batching through the real system: API, PostgreSQL, RabbitMQ, a worker process and
the tiny sd15 with batching on (4 images a call, 64x64 at most, waiting up to 1.5 s to fill).

The module runs a system of its own (its own database, its family on a queue of its own), so the
session's worker, which does not batch, never takes these jobs. Which call a job shared shows in
its ``batch`` (``GET /v1/jobs/{id}``, webhooks); the worker's metrics count batches and retries."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import JobEvent
from inference_server.devtools.registry_edit import with_family_keys
from tests.support.jobs import get, output_bytes, submit, wait_done
from tests.support.system import Proc, start_api, start_worker
from tests.support.waiting import wait_for

FAULT = Path(__file__).parent / "support" / "batch_fault"  # see its sitecustomize.py
BODY = {"family": "sd15", "width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def batch_env(system_env: dict[str, str], scratch_db_url: str, tiny_models: Path) -> dict[str, str]:
    models = with_family_keys(
        tiny_models,
        "sd15",
        "models-batching-test.toml",
        queue="jobs.sd15-batching-test",
        max_batch=4,
        batch_wait_ms=1500,
        batch_max_pixels=64 * 64,
    )
    path = os.pathsep.join(filter(None, [str(FAULT), system_env.get("PYTHONPATH", "")]))
    return dict(system_env, DATABASE_URL=scratch_db_url, MODELS_FILE=str(models), PYTHONPATH=path)


@pytest.fixture(scope="module")
def db(scratch_db_url: str) -> Iterator[sessionmaker[Session]]:
    from inference_server.db import make_database, make_session_factory

    engine = make_database(scratch_db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def system(batch_env: dict[str, str], logs_dir: Path) -> Iterator[dict[str, Any]]:
    """The module's API, batching worker and dispatcher (reconciler and webhooks)."""
    api, url = start_api(batch_env, logs_dir, name="api-batching")
    env = dict(batch_env, API_URL=url)
    dispatcher = Proc("dispatcher-batching", ["dispatcher"], env, logs_dir)
    worker = start_worker(env, logs_dir, families="sd15")
    procs = {"api": api, "dispatcher": dispatcher, "worker": worker, "url": url, "env": env}
    yield procs
    for name in ("worker", "dispatcher", "api"):
        procs[name].kill(15)


@pytest.fixture(scope="module")
def http(system: dict[str, Any], db: sessionmaker[Session]) -> Iterator[requests.Session]:
    from api.auth import create_tenant_key

    with db() as session:
        _, key = create_tenant_key(session, "batching")
    client = requests.Session()
    client.headers["Authorization"] = f"Bearer {key}"
    client.base_url = system["url"]  # type: ignore[attr-defined]
    yield client
    client.close()


def submit_together(http: requests.Session, bodies: list[dict[str, Any]]) -> list[str]:
    """Submit ``bodies`` while the worker is busy with another job (of another batch key), so all
    of them are queued when it takes the first: a slow submit cannot split them."""
    submit(http, {**BODY, "prompt": "hold", "steps": 30, "seed": 1})
    return [submit(http, body)["id"] for body in bodies]


def run_all(http: requests.Session, bodies: list[dict[str, Any]], *, together: bool = True) -> list[Any]:
    """Submit ``bodies`` (together, or back to back), and return each finished job."""
    ids = submit_together(http, bodies) if together else [submit(http, body)["id"] for body in bodies]
    return [wait_done(http, job_id, timeout=120) for job_id in ids]


def pixels(http: requests.Session, job_id: str, index: int = 0) -> np.ndarray:
    data = output_bytes(http, job_id, index).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def event_types(db: sessionmaker[Session], job_id: str) -> list[str]:
    with db() as session:
        rows = session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        return list(rows)


def members(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**BODY, **b} for b in bodies]


THREE = members(
    [
        {"prompt": "a red house", "seed": 10},
        {"prompt": "a blue boat", "seed": 20, "num_images": 2},
        {"prompt": "a green tree", "seed": 30},
    ]
)


def test_compatible_jobs_share_one_call_and_keep_their_own_results(http, db, receiver):
    bodies = [{**b, "webhook": {"url": receiver.url}} for b in THREE]
    first = run_all(http, bodies)
    assert [j["status"] for j in first] == ["succeeded"] * 3, first
    batch = first[0]["batch"]
    assert batch is not None and batch["size"] == 3, first[0]
    assert all(j["batch"] == batch for j in first)
    # Each job its own outputs, with its own seeds; different prompts and seeds, different images.
    assert [[o["seed"] for o in j["outputs"]] for j in first] == [[10], [20, 21], [30]]
    digests = [o["sha256"] for j in first for o in j["outputs"]]
    assert len(set(digests)) == 4
    # Its own events, and its own webhooks carrying its own outputs and the batch.
    for job in first:
        types = [t for t in event_types(db, job["id"]) if t != "job.progress"]
        # job.queued again when its place in the queue moves (the scheduler), never after the start
        assert types[0] == "job.queued" and [t for t in types if t != "job.queued"] == [
            "job.started",
            "job.succeeded",
        ]
        assert types.index("job.started") > max(i for i, t in enumerate(types) if t == "job.queued")
        wait_for(lambda job=job: "job.succeeded" in receiver.types(job["id"]), 30, what="the webhook")
        [done] = [e.json()["data"] for e in receiver.events(job["id"]) if e.type == "job.succeeded"]
        assert done["outputs"] == job["outputs"] and done["batch"] == batch
    # The same requests in the same batch: the same bytes, in another call.
    again = run_all(http, THREE)
    assert again[0]["batch"]["id"] != batch["id"] and again[0]["batch"]["size"] == 3
    assert [o["sha256"] for j in again for o in j["outputs"]] == digests
    # A job alone (it waits batch_wait_ms for company that never comes) gives the same images
    # up to the rounding of batched kernels: under a colour level on average.
    [alone] = run_all(http, THREE[:1], together=False)
    assert alone["status"] == "succeeded" and alone["batch"] is None, alone
    gap = np.abs(pixels(http, alone["id"]) - pixels(http, first[0]["id"])).mean()
    assert gap < 1.0
    assert np.abs(pixels(http, first[2]["id"]) - pixels(http, first[0]["id"])).mean() > 1.0


def test_a_canceled_member_does_not_fail_the_others(http):
    ids = submit_together(http, [{**b, "steps": 50} for b in THREE])

    def batched() -> bool:
        jobs = [get(http, i) for i in ids]
        return all(j["status"] == "running" and j["batch"] for j in jobs)

    wait_for(batched, 60, interval=0.05, what="the three jobs to run as one batch")
    resp = http.post(f"{http.base_url}/v1/jobs/{ids[1]}/cancel", timeout=10)  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    done = [wait_done(http, i) for i in ids]
    assert [j["status"] for j in done] == ["succeeded", "canceled", "succeeded"], done
    assert done[1]["outputs"] == [] and [o["seed"] for o in done[2]["outputs"]] == [30]
    assert done[0]["progress"]["step"] == 50


def test_incompatible_and_large_jobs_do_not_share_a_call(http):
    bodies = members(
        [
            {"prompt": "a", "steps": 3, "seed": 1},
            {"prompt": "b", "steps": 4, "seed": 2},
            {"prompt": "c", "steps": 3, "seed": 3},
            {"prompt": "d", "steps": 4, "seed": 4},
            {"prompt": "e", "width": 128, "height": 128, "seed": 5},  # over batch_max_pixels
            {"prompt": "f", "width": 128, "height": 128, "seed": 6},
        ]
    )
    jobs = run_all(http, bodies)
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    three, four = jobs[0]["batch"], jobs[1]["batch"]
    assert three and four and three["id"] != four["id"], jobs
    assert jobs[2]["batch"] == three and jobs[3]["batch"] == four
    assert three["size"] == four["size"] == 2
    assert jobs[4]["batch"] is None and jobs[5]["batch"] is None


def test_a_failing_batch_call_runs_its_members_alone(http, system):
    """A member the batched call cannot take (see tests/support/batch_fault): the pipeline refuses
    the whole call; each member, run alone, succeeds, so none fails."""
    bodies = [dict(b) for b in THREE]
    bodies[1]["prompt"] = "a blue boat [fails-in-a-batch]"
    jobs = run_all(http, bodies)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert jobs[0]["batch"]["size"] == 3  # claimed as one batch
    assert [[o["seed"] for o in j["outputs"]] for j in jobs] == [[10], [20, 21], [30]]
    log = system["worker"].output()
    assert "batch of 3 jobs failed (ModelError); running each alone" in log
    metrics = requests.get(system["worker"].metrics_url, timeout=10).text
    assert "inference_batches_retried_total 1.0" in metrics


def test_a_worker_killed_mid_batch_loses_no_member(http, system, logs_dir):
    """Every member holds a lease of its own: when the worker dies, each lease expires and the
    reconciler queues each member again, and the next worker finishes them."""
    ids = submit_together(http, [{**b, "steps": 50} for b in THREE])

    def batched() -> bool:
        return all(get(http, i)["batch"] and get(http, i)["progress"]["step"] >= 1 for i in ids)

    wait_for(batched, 60, interval=0.05, what="the batch to be running")
    system["worker"].kill(9)
    replacement = start_worker(system["env"], logs_dir, families="sd15")
    system["worker"] = replacement  # the module's teardown stops it
    done = [wait_done(http, i, timeout=120) for i in ids]
    assert [j["status"] for j in done] == ["succeeded"] * 3, done
    assert [j["attempts"] for j in done] == [2, 2, 2]
    assert [[o["seed"] for o in j["outputs"]] for j in done] == [[10], [20, 21], [30]]
