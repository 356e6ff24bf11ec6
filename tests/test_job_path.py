"""The whole job path on real components: API -> PostgreSQL + outbox -> RabbitMQ -> Celery worker ->
tiny diffusers pipeline -> S3 (moto server) -> events -> signed webhooks to a real receiver."""

from __future__ import annotations

import io

import standardwebhooks
from PIL import Image

import webhooks
from tests.support.jobs import data_uri, get, output_bytes, submit, wait_done
from tests.support.waiting import wait_for

BASE = {"family": "sd15", "prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 4, "seed": 7}


def test_txt2img_end_to_end_with_verified_webhooks(api_client, worker, dispatcher, receiver, tenant):
    job = submit(api_client, {**BASE, "webhook": {"url": receiver.url}})
    assert job["status"] == "queued" and job["params"]["seed"] == 7
    done = wait_done(api_client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["progress"]["percent"] == 100.0
    out = done["outputs"][0]
    assert (out["width"], out["height"], out["seed"], out["content_type"]) == (64, 64, 7, "image/png")
    image = Image.open(io.BytesIO(output_bytes(api_client, job["id"]).content))
    assert image.size == (64, 64)

    wait_for(lambda: "job.succeeded" in receiver.types(job["id"]), 30, what="job.succeeded webhook")
    events = receiver.events(job["id"])
    types = [e.type for e in events]
    assert types[0] == "job.queued" and "job.started" in types and types[-1] == "job.succeeded"
    independent = standardwebhooks.Webhook(tenant.webhook_secret)
    for event in events:
        independent.verify(event.body, event.headers)
        webhooks.verify(event.body, event.headers, tenant.webhook_secret)
    final = events[-1].json()["data"]
    assert final["status"] == "succeeded" and final["outputs"][0]["sha256"] == out["sha256"]


def test_same_seed_same_image_and_random_seed_reported(api_client, worker):
    a = wait_done(api_client, submit(api_client, BASE)["id"])
    b = wait_done(api_client, submit(api_client, BASE)["id"])
    assert a["outputs"][0]["sha256"] == b["outputs"][0]["sha256"]
    c = wait_done(api_client, submit(api_client, {**BASE, "seed": -1, "num_images": 2})["id"])
    seeds = [o["seed"] for o in c["outputs"]]
    assert c["params"]["seed"] >= 0 and seeds == [c["params"]["seed"], c["params"]["seed"] + 1]
    assert c["outputs"][0]["sha256"] != c["outputs"][1]["sha256"]


def test_img2img_from_data_uri(api_client, worker):
    source = Image.new("RGB", (80, 48), (200, 30, 30))
    job = submit(api_client, {**BASE, "task": "img2img", "image": data_uri(source), "strength": 0.5})
    assert job["params"]["image"].startswith("s3://")  # moved out of the row into storage
    done = wait_done(api_client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"]["total_steps"] == 2  # int(4 * 0.5) steps


def test_cancel_of_a_running_job_through_the_api(api_client, worker):
    """The API's side of a cancel: it answers with the job canceled mid-run, the record freezes
    there (no progress, no outputs afterwards), the worker takes the next job, and a finished job
    cannot be canceled. That the run itself stops within a step is tests/test_worker_cancel.py."""
    job = submit(api_client, {**BASE, "steps": 50, "width": 256, "height": 256})

    def running_with_progress():
        current = get(api_client, job["id"])
        return current if current["status"] == "running" and current["progress"]["step"] >= 1 else None

    wait_for(running_with_progress, 60, what="the job to run")
    resp = api_client.post(f"{api_client.base_url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    at_cancel = resp.json()["progress"]
    assert 1 <= at_cancel["step"] < at_cancel["total_steps"] == 50
    # The worker is free again soon: the next job succeeds.
    nxt = wait_done(api_client, submit(api_client, BASE)["id"], timeout=60)
    assert nxt["status"] == "succeeded"
    final = get(api_client, job["id"])
    assert final["status"] == "canceled" and final["outputs"] == []
    assert final["progress"]["step"] == at_cancel["step"]  # nothing recorded after the cancel
    again = api_client.post(f"{api_client.base_url}/v1/jobs/{nxt['id']}/cancel", timeout=10)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_worker_metrics_count_outcomes(api_client, worker):
    import requests

    wait_done(api_client, submit(api_client, BASE)["id"])
    text = requests.get(worker.metrics_url, timeout=10).text
    finished = [
        line
        for line in text.splitlines()
        if line.startswith('inference_jobs_finished_total{family="sd15",status="succeeded"}')
    ]
    assert finished and float(finished[0].split()[-1]) >= 1
    assert "inference_job_duration_seconds_bucket" in text and "engine_pipeline_loads_total" in text


def test_long_poll_returns_the_finished_job(api_client, worker):
    job = submit(api_client, BASE)
    resp = api_client.get(f"{api_client.base_url}/v1/jobs/{job['id']}", params={"wait": 60}, timeout=90)
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded"
    bad = api_client.get(f"{api_client.base_url}/v1/jobs/{job['id']}", params={"wait": 61}, timeout=10)
    assert bad.status_code == 422


def test_submit_with_prefer_wait_answers_with_the_finished_job(api_client, worker):
    resp = api_client.post(
        f"{api_client.base_url}/v1/jobs", json=BASE, headers={"Prefer": "respond-async, wait=60"}, timeout=90
    )
    assert resp.status_code == 202
    assert resp.headers["Preference-Applied"] == "wait=60"
    job = resp.json()
    assert job["status"] == "succeeded" and job["outputs"][0]["sha256"]
    assert get(api_client, job["id"]) == job
    # Without the preference the submit answers at once, with the job queued.
    quick = api_client.post(f"{api_client.base_url}/v1/jobs", json=BASE, timeout=30)
    assert quick.json()["status"] == "queued" and "Preference-Applied" not in quick.headers
    wait_done(api_client, quick.json()["id"])
