"""A cheap look at the broker: is it reachable, how many workers consume a queue (the API), how many
messages a queue holds ready (the reconciler)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

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
        """Consumers per queue, cached for ``ttl`` (0 for a queue that is not there, None where the
        broker cannot be asked)."""
        return self._cached(  # type: ignore[no-any-return]
            "consumers:" + ",".join(queues), lambda: self._declare(queues, lambda ready, consumers: consumers)
        )

    def ready(self, queues: list[str]) -> dict[str, int | None]:
        """Ready (undelivered) messages per queue, read now (0 for a queue that is not there, None
        where the broker cannot be asked)."""
        return self._declare(queues, lambda ready, consumers: ready)

    def _declare(self, queues: list[str], pick: Callable[[int, int], int]) -> dict[str, int | None]:
        """Passively declare each queue and ``pick`` from its (ready messages, consumers)."""
        from amqp.exceptions import NotFound

        if self.url.startswith("memory://"):  # `up`: one process, no broker to ask
            return {name: None for name in queues}
        result: dict[str, int | None] = {}
        try:
            with Connection(self.url, connect_timeout=self.timeout) as conn:
                for name in queues:
                    channel = conn.channel()
                    try:
                        _, ready, consumers = channel.queue_declare(queue=name, passive=True)
                        result[name] = pick(ready, consumers)
                    except NotFound:
                        result[name] = 0
                    except Exception:
                        result[name] = None
                    finally:
                        with contextlib.suppress(Exception):
                            channel.close()
        except Exception:
            return {name: None for name in queues}
        return result
