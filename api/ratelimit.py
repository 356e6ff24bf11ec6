"""Rate limits through the ``limits`` library: a moving window per key (an API key's tenant, or a
client address for failed authentications), counted in ``RATE_LIMIT_STORAGE_URL``.

``memory://`` counts per process (the embedded default); ``redis://…`` shares the counts between
every API replica on that Redis. When Redis does not answer, each process falls back to counting in
its own memory (so a fleet of N replicas lets through at most N times the limit) and logs it, rather
than refusing every request: the limiter protects capacity, and an outage of a side store must not
take the whole API down with it. ``inference_rate_limit_storage_errors_total`` counts those fallbacks."""

from __future__ import annotations

import logging
import time
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from prometheus_client import CollectorRegistry, Counter

from inference_server.errors import RateLimited

log = logging.getLogger(__name__)

# A Redis that is slow to answer costs every request this much at most; after a failure it is not
# asked again for RETRY_AFTER seconds (the process counts locally meanwhile).
SOCKET_TIMEOUT = 0.5
RETRY_AFTER = 5.0


class RateLimitExceeded(RateLimited):
    """Rate limited, with the seconds until the next request would pass (sent as ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimitStore:
    """Where the counts live: the configured storage, and this process's memory to fall back on."""

    def __init__(self, url: str, *, key_prefix: str, metrics: CollectorRegistry | None = None) -> None:
        self.url = url
        self.shared = not url.startswith("memory://")
        self._local = MovingWindowRateLimiter(storage_from_string("async+memory://"))
        self._primary = self._local
        if self.shared:
            storage = storage_from_string(
                "async+" + url,
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
            )
            self._primary = MovingWindowRateLimiter(storage)
        self._down_until = 0.0
        self.errors = Counter(
            "inference_rate_limit_storage_errors_total",
            "Rate-limit checks counted in process memory because the shared storage failed",
            registry=metrics if metrics is not None else CollectorRegistry(),
        )

    def limiter(self) -> MovingWindowRateLimiter:
        """The limiter to count with now: the shared one unless it failed in the last seconds."""
        if self.shared and time.monotonic() < self._down_until:
            return self._local
        return self._primary

    def failed(self, exc: Exception) -> MovingWindowRateLimiter:
        """Note a failure of the shared storage; returns the local limiter to count with instead."""
        if time.monotonic() >= self._down_until:
            log.warning("rate-limit storage %s failed (%s); counting per process for now", self._where(), exc)
        self._down_until = time.monotonic() + RETRY_AFTER
        self.errors.inc()
        return self._local

    def _where(self) -> str:
        host = self.url.split("@")[-1]  # never log a password
        return host.split("://")[-1] if "://" in host else host


class RateLimiter:
    """``per_minute`` events per key in any minute, counted in ``store`` under ``name``."""

    def __init__(self, per_minute: int, store: LimitStore, *, name: str) -> None:
        self.item = RateLimitItemPerMinute(per_minute)
        self.store = store
        self.name = name

    async def check(self, key: str, *, spend: bool = True) -> None:
        """Count one event for ``key``, or raise ``RateLimitExceeded`` when the window is full; with
        ``spend=False`` only the raising (the event is counted later, when it happens)."""
        limiter = self.store.limiter()
        try:
            allowed = await self._ask(limiter, key, spend)
        except (StorageError, OSError) as exc:
            limiter = self.store.failed(exc)
            allowed = await self._ask(limiter, key, spend)
        if allowed:
            return
        try:
            reset, _ = await limiter.get_window_stats(self.item, self.name, key)
        except (StorageError, OSError):
            reset = time.time() + self.item.get_expiry()
        wait = max(0.0, reset - time.time())
        raise RateLimitExceeded(f"rate limit exceeded; retry in {wait:.1f}s", retry_after=wait)

    async def _ask(self, limiter: Any, key: str, spend: bool) -> bool:
        if spend:
            return bool(await limiter.hit(self.item, self.name, key))
        return bool(await limiter.test(self.item, self.name, key))
