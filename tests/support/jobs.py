"""A job seen from the HTTP side, as a client of the running API sees it."""

from __future__ import annotations

import base64
import io
from typing import Any

import requests
from PIL import Image

from tests.support.waiting import wait_for

TERMINAL = {"succeeded", "failed", "canceled"}


def submit(http: requests.Session, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    resp = http.post(f"{http.base_url}/v1/jobs", json=body, headers=headers, timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 202, resp.text
    return resp.json()


def get(http: requests.Session, job_id: str) -> dict[str, Any]:
    resp = http.get(f"{http.base_url}/v1/jobs/{job_id}", timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_done(http: requests.Session, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = get(http, job_id)
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout, interval=0.1, what=f"job {job_id} to finish")


def output_bytes(http: requests.Session, job_id: str, index: int = 0) -> requests.Response:
    resp = http.get(f"{http.base_url}/v1/jobs/{job_id}/outputs/{index}", timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == 200, resp.text
    return resp


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
