"""Waiting for a condition with a deadline: the only way the tests wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 30.0, *, interval: float = 0.05, what: str
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail the test with
    ``what`` in the message after ``timeout`` seconds. The last call is made at the deadline, so a
    condition met while sleeping is not reported as a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
