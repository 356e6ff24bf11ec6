"""Long-polling for a job's end: ``GET /v1/jobs/{id}?wait=N`` answers as soon as the job finishes.

On PostgreSQL workers and cancels NOTIFY ``job_finished`` in the transaction that ends a job; the
API's event feed (``api/feed.py``) hears it on its LISTEN connection and calls ``announce``, which
wakes the waiting requests. Elsewhere waiting requests re-read the job every ``poll`` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine


class Waiting:
    """One request waiting for one job."""

    __slots__ = ("event", "job", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.job: dict[str, Any] | None = None


class JobWaiter:
    def __init__(self, engine: Engine, *, poll: float = 0.25) -> None:
        self.engine = engine
        self.poll = poll
        self.listening = engine.dialect.name == "postgresql"
        self._waiting: dict[str, set[Waiting]] = defaultdict(set)
        self._lock = threading.Lock()

    def register(self, job_id: str) -> Waiting:
        """Call before reading the job's status, so a finish in between is not missed."""
        waiting = Waiting(asyncio.get_running_loop())
        with self._lock:
            self._waiting[job_id].add(waiting)
        return waiting

    def unregister(self, job_id: str, waiting: Waiting) -> None:
        with self._lock:
            waiters = self._waiting.get(job_id)
            if waiters:
                waiters.discard(waiting)
                if not waiters:
                    del self._waiting[job_id]

    async def wait(self, waiting: Waiting, timeout: float) -> dict[str, Any] | None:
        """Until the job is announced finished, ``timeout`` passes, or (without LISTEN) one poll.

        Returns the finished job when the announcement carried it."""
        limit = timeout if self.listening else min(timeout, self.poll)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiting.event.wait(), limit)
        return waiting.job

    def _wake(self, job_id: str, job: dict[str, Any] | None = None) -> None:
        with self._lock:
            waiters = self._waiting.pop(job_id, set())
        for waiting in waiters:
            waiting.job = job
            waiting.loop.call_soon_threadsafe(waiting.event.set)

    def announce(self, payload: str) -> None:
        """A ``job_finished`` payload was heard: wake the requests waiting for that job."""
        if payload.startswith("{"):
            message = json.loads(payload)
            self._wake(message["id"], message.get("job"))
        else:
            self._wake(payload)

    def wake_all(self) -> None:
        """Wake every waiting request (finishes may have gone unheard): each re-reads its job."""
        with self._lock:
            ids = list(self._waiting)
        for job_id in ids:
            self._wake(job_id)
