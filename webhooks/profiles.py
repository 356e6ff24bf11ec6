"""The `split` webhook profile: three callbacks shaped the way backends built for them expect.

A `split` destination gets progress as ``PATCH {url}/progress``, success as ``POST {url}/complete``
(output URLs and the generation's metadata) and failure or cancel as ``POST {url}/failed`` (an
``error_code`` and ``error_message``). ``job.queued`` and ``job.started`` have no endpoint there and
are not sent (``events.SPLIT_EVENTS``). Each request carries the tenant's static bearer token (when
set), ``X-Request-Source: inference-server`` and, as every delivery, ``webhook-id`` and the Standard
Webhooks signature of its exact body, so a receiver can verify and dedupe it.

Field names follow the backend this profile was made for (``generation_id``, ``progress.current_step``,
``progress_percent``, ``result_url``, ``metadata.guidance_scale``); ``generation_id`` is the key
the job was submitted with (the AMQP ``message_id`` or the HTTP ``Idempotency-Key``), else the
job id, so a backend finds its own record without keeping ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from inference_server.jobs.enums import EventType
from webhooks.delivery import AttemptResult, attempt, encode_body
from webhooks.recording import Claimed
from webhooks.transport import PinnedPool

REQUEST_SOURCE = "inference-server"
CANCELED_MESSAGE = "the job was canceled"


@dataclass(frozen=True)
class SplitRequest:
    method: str
    url: str
    body: dict[str, Any]


def endpoint(url: str, name: str) -> str:
    """``{url}/{name}``, keeping the URL's query string."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def split_request(url: str, payload: dict[str, Any], generation_id: str | None) -> SplitRequest:
    """The callback for one event ``payload`` (the standard webhook body, output URLs absolute)."""
    job = payload["data"]
    kind = EventType(payload["type"])
    common = {
        "generation_id": generation_id or job["id"],
        "job_id": job["id"],
        "event": kind.value,
        "timestamp": payload["timestamp"],
    }
    if kind == EventType.PROGRESS:
        progress = job["progress"]
        body = {
            **common,
            "status": job["status"],
            "progress": {
                "current_step": progress["step"],
                "total_steps": progress["total_steps"],
                "progress_percent": progress["percent"],
                "estimated_seconds": progress["eta_seconds"],
            },
        }
        return SplitRequest("PATCH", endpoint(url, "progress"), body)
    if kind == EventType.SUCCEEDED:
        urls = [o["url"] for o in job["outputs"] if o.get("url") and o.get("kind", "image") == "image"]
        body = {
            **common,
            "status": "completed",
            "result_url": urls[0] if urls else None,
            "result_urls": urls,
            "outputs": job["outputs"],
            "metadata": _metadata(job),
            "completed_at": job["finished_at"],
        }
        return SplitRequest("POST", endpoint(url, "complete"), body)
    if kind in (EventType.FAILED, EventType.CANCELED):
        error = job.get("error") or {}
        canceled = kind == EventType.CANCELED
        body = {
            **common,
            "status": "canceled" if canceled else "failed",
            "error_code": "canceled" if canceled else error.get("code"),
            "error_message": CANCELED_MESSAGE if canceled else error.get("message"),
            "failed_at": job["finished_at"],
        }
        return SplitRequest("POST", endpoint(url, "failed"), body)
    raise ValueError(f"the split profile has no endpoint for {kind.value}")


def _metadata(job: dict[str, Any]) -> dict[str, Any]:
    params = job.get("params") or {}
    seeds = [o["seed"] for o in job["outputs"]]
    return {
        "seed": seeds[0] if seeds else params.get("seed"),
        "seeds": seeds,
        "steps": params.get("steps"),
        "guidance_scale": params.get("guidance_scale"),
        "width": params.get("width"),
        "height": params.get("height"),
        "family": job["family"],
        "model": job["model"],
        "task": job["task"],
    }


def split_headers(token: str | None) -> dict[str, str]:
    """The headers a `split` callback carries besides the signature."""
    headers = {"X-Request-Source": REQUEST_SOURCE}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def split_attempt(pool: PinnedPool, c: Claimed, *, allow_private: bool, timeout: float) -> AttemptResult:
    """Send one `split` callback for a claimed delivery (its ``payload``): same guard, timeout and
    result handling as a standard attempt, with the profile's method, path, body and headers."""
    assert c.payload is not None
    request = split_request(c.url, c.payload, c.request_key)
    return attempt(
        pool,
        request.url,
        c.event_id,
        encode_body(request.body),
        c.secrets,
        allow_private=allow_private,
        timeout=timeout,
        method=request.method,
        extra_headers=split_headers(c.bearer),
    )
