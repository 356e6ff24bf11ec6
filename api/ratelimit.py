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

    def check(self, key: str, *, spend: bool = True, per_minute: int | None = None) -> None:
        """Take a token for ``key``, or raise ``RateLimitExceeded`` when none is left; with
        ``spend=False`` only the raising (a token is spent later, when the thing counted happens).
        ``per_minute``: this key's own rate instead of the limiter's."""
        rate, capacity = self._rate(per_minute)
        now = time.monotonic()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._buckets.clear()  # forgets recent spenders: briefly lenient, never unbounded
            tokens, last = self._buckets.get(key, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimitExceeded(f"rate limit exceeded; retry in {wait:.1f}s", retry_after=wait)
            self._buckets[key] = (tokens - 1.0 if spend else tokens, now)

    def remaining(self, key: str, *, per_minute: int | None = None) -> int:
        """Whole requests ``key`` may send now (in this process)."""
        rate, capacity = self._rate(per_minute)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (capacity, now))
        return int(min(capacity, tokens + (now - last) * rate))

    def _rate(self, per_minute: int | None) -> tuple[float, float]:
        if per_minute is None:
            return self.rate, self.capacity
        return per_minute / 60.0, float(per_minute)
