"""A per-tenant token bucket (per API process; put a shared limiter in the gateway for global limits)."""

from __future__ import annotations

import threading
import time

from inference_server.errors import RateLimited


class RateLimitExceeded(RateLimited):
    """Rate limited, with the seconds until the next request would pass (sent as ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, per_minute: int, *, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys  # client addresses are unbounded: memory must not be
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str, *, spend: bool = True) -> None:
        """Take a token for ``key``, or raise ``RateLimitExceeded`` when none is left; with
        ``spend=False`` only the raising (a token is spent later, when the thing counted happens)."""
        now = time.monotonic()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._buckets.clear()  # forgets recent spenders: briefly lenient, never unbounded
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimitExceeded(f"rate limit exceeded; retry in {wait:.1f}s", retry_after=wait)
            self._buckets[key] = (tokens - 1.0 if spend else tokens, now)
