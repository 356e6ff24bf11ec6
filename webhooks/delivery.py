"""One webhook HTTP attempt, and what a result means for the delivery's next state."""

from __future__ import annotations

import http.client
import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from inference_server import netguard
from inference_server.db.base import utcnow
from inference_server.errors import UnsafeURL
from webhooks.signing import webhook_headers
from webhooks.tables import DeliveryStatus
from webhooks.transport import PinnedPool

USER_AGENT = "inference-server-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024  # read (and ignore) at most this much of a receiver's answer
MAX_RETRY_AFTER = 86400.0
JITTER = 0.1  # ±10 % on scheduled delays, so retries of a burst do not arrive in lockstep


@dataclass(frozen=True)
class AttemptResult:
    started_at: datetime
    duration: float
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    unsafe: bool = False
    delivered: bool = False  # taken without an HTTP status: an AMQP reply the broker confirmed

    @property
    def ok(self) -> bool:
        return self.delivered or (self.status_code is not None and 200 <= self.status_code < 300)


def encode_body(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed) for an event payload."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def attempt(
    pool: PinnedPool,
    url: str,
    msg_id: str,
    body: bytes,
    secrets: list[str],
    *,
    allow_private: bool,
    timeout: float,
    method: str = "POST",
    extra_headers: dict[str, str] | None = None,
) -> AttemptResult:
    """POST (or ``method``) one signed delivery. Never raises: every failure becomes an
    ``AttemptResult``.

    Redirects are not followed (a 3xx is a failure). ``timeout`` bounds the whole attempt."""
    started_at = utcnow()
    t0 = time.monotonic()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **(extra_headers or {}),
        **webhook_headers(msg_id, body, secrets),
    }
    try:
        response = pool.post(
            url,
            body,
            headers,
            allow_private=allow_private,
            timeout=timeout,
            max_response_bytes=MAX_RESPONSE_BYTES,
            method=method,
        )
    except UnsafeURL as exc:
        return AttemptResult(
            started_at, time.monotonic() - t0, error=f"unsafe_url: {exc.message}", unsafe=True
        )
    except (OSError, http.client.HTTPException) as exc:
        return AttemptResult(started_at, time.monotonic() - t0, error=netguard.describe(exc))
    status = response.status
    error = None
    if not 200 <= status < 300:
        error = f"HTTP {status}"
        if 300 <= status < 400:
            error += " (redirects are not followed)"
    retry_after = parse_retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None
    return AttemptResult(
        started_at, time.monotonic() - t0, status_code=status, error=error, retry_after=retry_after
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped at a day."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    seconds = (when - (now or utcnow())).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class NextState:
    status: str
    next_attempt_at: datetime | None
    outcome: str  # metrics label: succeeded, retry, exhausted, gone


def plan_next(
    result: AttemptResult, attempts_in_schedule: int, delays: list[float], now: datetime | None = None
) -> NextState:
    """Where a delivery goes after an attempt. ``attempts_in_schedule`` counts this attempt.

    There are ``1 + len(delays)`` attempts; a 429/503 waits at least its ``Retry-After``; a 410
    stops; an unsafe URL is not retried (it does not become safe by waiting)."""
    now = now or utcnow()
    if result.ok:
        return NextState(DeliveryStatus.SUCCEEDED, None, "succeeded")
    if result.status_code == 410:
        return NextState(DeliveryStatus.GONE, None, "gone")
    if result.unsafe or attempts_in_schedule > len(delays):
        return NextState(DeliveryStatus.EXHAUSTED, None, "exhausted")
    delay = delays[attempts_in_schedule - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if result.retry_after is not None:
        delay = max(delay, result.retry_after)
    return NextState(DeliveryStatus.PENDING, now + timedelta(seconds=delay), "retry")
