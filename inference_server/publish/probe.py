"""A cheap look at the broker for the API: is it reachable, how many workers consume a queue."""

from __future__ import annotations

import contextlib
import threading
import time

from kombu import Connection


class BrokerProbe:
    def __init__(self, url: str, *, ttl: float = 5.0, timeout: float = 2.0) -> None:
        self.url = url
        self.ttl = ttl
        self.timeout = timeout
        self._cache: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def _cached(self, key: str, compute):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            self._cache[key] = (now + self.ttl, value)
        return value

    def reachable(self) -> bool:
        def check() -> bool:
            try:
                with Connection(self.url, connect_timeout=self.timeout) as conn:
                    conn.ensure_connection(max_retries=1, timeout=self.timeout)
                return True
            except Exception:
                return False

        return bool(self._cached("__ping__", check))

    def consumers(self, queues: list[str]) -> dict[str, int | None]:
        """Consumers per queue (None where the broker or the queue is not there)."""

        def count() -> dict[str, int | None]:
            result: dict[str, int | None] = {}
            try:
                with Connection(self.url, connect_timeout=self.timeout) as conn:
                    for name in queues:
                        channel = conn.channel()
                        try:
                            _, _, consumers = channel.queue_declare(queue=name, passive=True)
                            result[name] = consumers
                        except Exception:
                            result[name] = 0
                        finally:
                            with contextlib.suppress(Exception):
                                channel.close()
            except Exception:
                return {name: None for name in queues}
            return result

        if self.url.startswith("memory://"):
            return {name: None for name in queues}
        return self._cached("consumers:" + ",".join(queues), count)  # type: ignore[no-any-return]
