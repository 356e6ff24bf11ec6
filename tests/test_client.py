"""The Python client against the running API and a CPU worker: submit, wait, download, cancel,
idempotent replay, uploads, errors with the API's code, and retries of 429/503 (against a small
local HTTP server that refuses first) that honour ``Retry-After``."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from inference_server.client import AsyncClient, Client, ClientError, JobRequest, verify_webhook
from inference_server.client.common import RetryPolicy

OK = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def client(api_server: str, tenant, worker) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    with Client(api_server, tenant.api_key) as c:
        yield c


def test_submit_wait_download(client: Client) -> None:
    job = client.submit(JobRequest(**OK, seed=7))
    assert job["status"] in ("queued", "running")
    seen: list[str] = []
    done = client.wait(job["id"], timeout=120, on_update=lambda j: seen.append(j["status"]))
    assert done["status"] == "succeeded", done
    assert seen[-1] == "succeeded"
    png = client.download(done["id"])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert any(j["id"] == job["id"] for j in client.iter_jobs(family="sd15"))


def test_submit_is_idempotent_by_default_and_replays_with_the_same_key(client: Client) -> None:
    a = client.submit(OK)
    b = client.submit(OK)
    assert a["id"] != b["id"]  # each call has a fresh key: two jobs
    c = client.submit(OK, idempotency_key="replay-me")
    d = client.submit(OK, idempotency_key="replay-me")
    assert c["id"] == d["id"]
    with pytest.raises(ClientError) as err:
        client.submit({**OK, "prompt": "another"}, idempotency_key="replay-me")
    assert (err.value.status, err.value.code) == (409, "idempotency_conflict")


def test_cancel(client: Client) -> None:
    job = client.submit({**OK, "steps": 50, "width": 256, "height": 256})
    client.cancel(job["id"])
    assert client.wait(job["id"], timeout=60)["status"] == "canceled"
    assert client.cancel(job["id"])["status"] == "canceled"  # asking again changes nothing


def test_errors_carry_the_api_code(client: Client) -> None:
    with pytest.raises(ClientError) as err:
        client.submit({**OK, "family": "nope"})
    assert (err.value.status, err.value.code) == (400, "unknown_family")
    with pytest.raises(ClientError) as err:
        client.get("0" * 32)
    assert (err.value.status, err.value.code) == (404, "job_not_found")


def test_upload_then_inpaint_and_submit_with_wait(client: Client) -> None:
    def png(color: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buf, "PNG")
        return buf.getvalue()

    image = client.upload(png("red"), "red.png")
    mask = client.upload(png("white"), "mask.png")
    assert image["uri"] and (image["width"], image["height"]) == (64, 64)
    job = client.submit({**OK, "task": "inpaint", "image": image["uri"], "mask": mask["uri"]}, wait=60)
    done = job if job["status"] == "succeeded" else client.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["task"] == "inpaint"


def test_async_client(api_server: str, tenant, worker) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[dict[str, Any], bytes]:
        async with AsyncClient(api_server, tenant.api_key) as c:
            job = await c.submit(OK)
            done = await c.wait(job["id"], timeout=120)
            return done, await c.download(job["id"])

    done, png = asyncio.run(run())
    assert done["status"] == "succeeded"
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_verify_webhook_is_the_projects_verifier() -> None:
    from webhooks import WebhookVerificationError
    from webhooks.signing import webhook_headers

    secret = "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0"
    body = json.dumps({"type": "job.succeeded", "data": {}}).encode()
    headers = webhook_headers("msg_1", body, [secret])
    assert verify_webhook(body, headers, secret)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body + b" ", headers, secret)


class Refusing:
    """A local HTTP server answering the first ``refusals`` requests with ``status`` (and
    ``Retry-After`` when given), then 202 with a job; it records each request's Idempotency-Key."""

    def __init__(self, refusals: int, status: int, retry_after: str | None) -> None:
        self.keys: list[str | None] = []
        self.times: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.keys.append(self.headers.get("Idempotency-Key"))
                outer.times.append(time.monotonic())
                if len(outer.keys) <= refusals:
                    body = json.dumps({"error": {"code": "rate_limited", "message": "slow down"}}).encode()
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                else:
                    body = json.dumps({"id": "j1", "status": "queued"}).encode()
                    self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def refusing() -> Iterator[Any]:
    made: list[Refusing] = []

    def make(refusals: int, status: int = 429, retry_after: str | None = None) -> Refusing:
        made.append(Refusing(refusals, status, retry_after))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_429_is_retried_after_retry_after_with_the_same_key(refusing: Any) -> None:
    server = refusing(1, 429, "1")
    with Client(server.url, "isk_x", retry=RetryPolicy(backoff=0.01)) as c:
        assert c.submit(OK)["id"] == "j1"
    assert len(server.keys) == 2 and server.keys[0] and server.keys[0] == server.keys[1]
    assert server.times[1] - server.times[0] >= 0.95  # Retry-After, not the 0.01 s backoff


def test_a_503_is_retried_with_backoff_and_async_too(refusing: Any) -> None:
    server = refusing(2, 503)

    async def run() -> dict[str, Any]:
        async with AsyncClient(server.url, "isk_x", retry=RetryPolicy(backoff=0.05)) as c:
            return await c.submit(OK)

    assert asyncio.run(run())["id"] == "j1"
    assert len(server.keys) == 3 and len(set(server.keys)) == 1


def test_retries_end_with_the_apis_error(refusing: Any) -> None:
    server = refusing(10, 429, "0")
    c = Client(server.url, "isk_x", retry=RetryPolicy(retries=2, backoff=0.01))
    with c, pytest.raises(ClientError) as err:
        c.submit(OK)
    assert (err.value.status, err.value.code) == (429, "rate_limited")
    assert len(server.keys) == 3
