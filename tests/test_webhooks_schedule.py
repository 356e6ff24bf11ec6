"""The retry schedule as a pure function: attempts, jitter, Retry-After, 410, refused URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from inference_server.settings import STANDARD_WEBHOOK_DELAYS, Settings
from webhooks.delivery import AttemptResult, parse_retry_after, plan_next

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DELAYS = [5.0, 300.0, 1800.0]


def result(code: int | None = None, **kw) -> AttemptResult:  # type: ignore[no-untyped-def]
    return AttemptResult(NOW, 0.01, status_code=code, **kw)


def test_default_schedule_is_standard_webhooks() -> None:
    assert Settings(database_url="sqlite://").webhook_retry_delays == list(STANDARD_WEBHOOK_DELAYS)
    assert Settings(database_url="sqlite://", webhook_retry_delays="1,2.5").webhook_retry_delays == [1.0, 2.5]


@pytest.mark.parametrize("code", [200, 201, 204, 299])
def test_2xx_succeeds(code: int) -> None:
    assert plan_next(result(code), 1, DELAYS, NOW).status == "succeeded"


@pytest.mark.parametrize("code", [301, 302, 307, 400, 404, 500, 502, None])
def test_failures_follow_the_schedule_with_jitter(code: int | None) -> None:
    for n, delay in enumerate(DELAYS, start=1):
        nxt = plan_next(result(code, error="x"), n, DELAYS, NOW)
        assert nxt.status == "pending" and nxt.outcome == "retry"
        wait = (nxt.next_attempt_at - NOW).total_seconds()
        assert 0.9 * delay <= wait <= 1.1 * delay
    assert plan_next(result(code), len(DELAYS) + 1, DELAYS, NOW).status == "exhausted"


def test_jitter_spreads_retries() -> None:
    waits = {plan_next(result(500), 2, DELAYS, NOW).next_attempt_at for _ in range(20)}
    assert len(waits) > 10


def test_retry_after_is_a_floor() -> None:
    late = plan_next(result(429, retry_after=3600.0), 1, DELAYS, NOW)
    assert late.next_attempt_at - NOW >= timedelta(seconds=3600)
    soon = plan_next(result(503, retry_after=1.0), 2, DELAYS, NOW)
    assert soon.next_attempt_at - NOW >= timedelta(seconds=270)  # the schedule still applies


def test_gone_and_unsafe_stop_at_once() -> None:
    assert plan_next(result(410), 1, DELAYS, NOW).status == "gone"
    assert plan_next(result(error="unsafe_url: x", unsafe=True), 1, DELAYS, NOW).status == "exhausted"


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("99999999") == 86400.0
    assert parse_retry_after(format_datetime(NOW + timedelta(seconds=90), usegmt=True), now=NOW) == 90.0
    assert parse_retry_after(format_datetime(NOW - timedelta(seconds=90), usegmt=True), now=NOW) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
