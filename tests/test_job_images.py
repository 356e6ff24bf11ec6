"""A job of several images through the real API and worker: one denoising loop for all of them, so
its progress counts that loop's steps from submit to success, and each output keeps its own seed."""

from __future__ import annotations

from typing import Any

import requests
from PIL import Image

from tests.support.jobs import TERMINAL, data_uri, get, submit
from tests.support.waiting import wait_for

BASE = {"family": "sd15", "prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 40}


def watch(http: requests.Session, job_id: str, timeout: float = 120.0) -> tuple[list[dict[str, Any]], dict]:
    """Every progress the job showed while it ran, and the finished job."""
    running: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        job = get(http, job_id)
        if job["status"] == "running":
            running.append(job["progress"])
        return job if job["status"] in TERMINAL else None

    return running, wait_for(finished, timeout, interval=0.02, what=f"job {job_id} to finish")


def test_two_images_count_one_loop_from_submit_to_success(api_client, worker):
    job = submit(api_client, {**BASE, "steps": 40, "num_images": 2})
    assert job["progress"]["total_steps"] == 40 and job["progress"]["step"] == 0
    running, done = watch(api_client, job["id"])
    assert done["status"] == "succeeded", done
    seen = [p for p in running if p["step"] >= 1]
    assert seen, f"no progress seen while the job ran: {running}"
    # The worker saves the steps of the one loop both images share, never steps x images.
    assert all(p["total_steps"] == 40 and p["step"] <= 40 for p in running), running
    assert [p["step"] for p in seen] == sorted(p["step"] for p in seen)
    assert done["progress"] == {"step": 40, "total_steps": 40, "percent": 100.0, "eta_seconds": 0.0}
    assert [o["seed"] for o in done["outputs"]] == [40, 41]
    assert done["outputs"][0]["sha256"] != done["outputs"][1]["sha256"]


def test_the_same_batched_request_gives_the_same_bytes(api_client, worker):
    source = Image.new("RGB", (64, 64), (30, 120, 200))
    source.paste((220, 200, 40), (0, 0, 32, 32))
    body = {**BASE, "width": 64, "height": 64, "steps": 8, "num_images": 3}
    for extra in ({}, {"task": "img2img", "image": data_uri(source), "strength": 0.5}):
        jobs = [submit(api_client, {**body, **extra}) for _ in range(2)]
        assert all(j["progress"]["total_steps"] == (4 if extra else 8) for j in jobs)
        first, second = (watch(api_client, j["id"])[1] for j in jobs)
        assert first["status"] == second["status"] == "succeeded", (first, second)
        assert [o["seed"] for o in first["outputs"]] == [40, 41, 42]
        digests = [o["sha256"] for o in first["outputs"]]
        assert digests == [o["sha256"] for o in second["outputs"]] and len(set(digests)) == 3
        assert first["progress"]["step"] == first["progress"]["total_steps"] == (4 if extra else 8)
