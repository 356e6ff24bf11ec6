"""What the sync and async clients share: request bodies, error decoding and the retry schedule."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from inference_server.jobs.spec import JobRequest

Job = dict[str, Any]  # a job as GET /v1/jobs/{id} returns it
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
RETRY_STATUSES = frozenset({429, 503})
MAX_POLL = 60.0  # the API holds a long-poll at most this long


class ClientError(Exception):
    """An error answer of the API: ``status`` is its HTTP status, ``code`` and ``message`` its
    error body (``code`` is ``http_<status>`` when the body is not the API's error shape)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def error_from(status: int, body: bytes) -> ClientError:
    """The ``ClientError`` of an answer with ``status`` and raw ``body``."""
    import json

    try:
        err = json.loads(body)["error"]
        return ClientError(status, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ClientError(status, f"http_{status}", body[:200].decode("utf-8", "replace"))


def job_body(request: JobRequest | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of ``request``, checked against the API's model first (a mistake the schema can
    see fails here, before a round trip). Only the fields set are sent: defaults stay the server's."""
    model = request if isinstance(request, JobRequest) else JobRequest.model_validate(dict(request))
    return model.model_dump(mode="json", exclude_unset=True)


def submit_headers(idempotency_key: str | None, wait: float | None) -> dict[str, str]:
    """Submit headers: an Idempotency-Key always (a uuid4 unless given), so a retried submit
    cannot make a second job; ``Prefer: wait=N`` to be answered when the job ends."""
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if wait:
        headers["Prefer"] = f"wait={int(min(wait, MAX_POLL))}"
    return headers


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass
class RetryPolicy:
    """``retries`` more attempts after a 429, a 503 or (for safe requests) a connection failure;
    the n-th waits ``Retry-After`` when the answer has one, else ``backoff * 2**n`` with jitter,
    never more than ``max_delay``."""

    retries: int = 4
    backoff: float = 0.5
    max_delay: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: str | None) -> float:
        told = retry_after_seconds(retry_after)
        if told is not None:
            return min(told, self.max_delay)
        base = self.backoff * (2**attempt)
        return min(base * (0.5 + self.rng.random() / 2), self.max_delay)


def params(**values: Any) -> dict[str, Any]:
    """Query parameters without the ones left at None."""
    return {k: v for k, v in values.items() if v is not None}
