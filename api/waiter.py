"""Long-polling for a job's end: ``GET /v1/jobs/{id}?wait=N`` answers as soon as the job finishes.

On PostgreSQL one thread per API process LISTENs on ``job_finished`` (workers and cancels NOTIFY it
in the transaction that ends a job) and wakes the waiting requests. Elsewhere waiting requests
re-read the job every ``poll`` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine

from inference_server.db.base import listening_connection
from inference_server.events import JOB_FINISHED_CHANNEL

log = logging.getLogger(__name__)


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
        self._stop = threading.Event()

    def start(self) -> None:
        if self.listening:
            threading.Thread(target=self._listen, name="job-waiter", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

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

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                raw = listening_connection(self.engine, JOB_FINISHED_CHANNEL)
                try:
                    self._drain(raw.driver_connection)
                finally:
                    raw.invalidate()
            except Exception as exc:
                log.warning("job waiter: %s; reconnecting", exc)
                self._wake_all()  # waiting requests re-read the job instead of missing its end
                self._stop.wait(1.0)

    def _drain(self, conn) -> None:  # type: ignore[no-untyped-def]
        while not self._stop.is_set():
            if select.select([conn], [], [], 1.0)[0]:
                conn.poll()
                while conn.notifies:
                    payload = conn.notifies.pop(0).payload
                    if payload.startswith("{"):
                        message = json.loads(payload)
                        self._wake(message["id"], message.get("job"))
                    else:
                        self._wake(payload)

    def _wake_all(self) -> None:
        with self._lock:
            ids = list(self._waiting)
        for job_id in ids:
            self._wake(job_id)
