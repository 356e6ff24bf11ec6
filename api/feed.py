"""The live side of event streams: one task per API process reads new job events and hands each to
the streams (SSE and WebSocket) that want it.

What wakes it, on PostgreSQL: a NOTIFY on ``job_events`` (progress, start, requeue) or
``job_finished`` (ends), heard on one LISTEN connection per process whose socket the event loop
watches (no thread). Without a notification (SQLite, a dropped listener, a submit's ``job.queued``,
which sends none) it reads every ``EVENTS_POLL_INTERVAL`` seconds anyway. A notification only says
"read again": the read is by sequence number (``jobs.history.scan``), so a lost or coalesced one
loses nothing, and numbers that were taken but not yet committed are looked for again.

The same connection hears ``job_finished`` for the long-polling waiter (``api/waiter.py``), so the
process holds one LISTEN connection in all. Streams cost a queue each, not a thread or a connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from inference_server.db.base import listening_connection
from inference_server.events import JOB_EVENTS_CHANNEL, JOB_FINISHED_CHANNEL
from inference_server.jobs import history
from inference_server.jobs.history import StoredEvent

log = logging.getLogger(__name__)

MISSING_GRACE = 15.0  # seconds a sequence number may stay taken but uncommitted before it is given up
MAX_MISSING = 5000
MAX_BACKLOG = 10_000  # events queued for one slow stream before it is ended (the client resumes)


class Subscription:
    """One stream's queue of live events. ``None`` in the queue means the stream fell too far behind."""

    __slots__ = ("job_id", "queue", "tenant_id")

    def __init__(self, job_id: str | None, tenant_id: str | None) -> None:
        self.job_id = job_id
        self.tenant_id = tenant_id
        self.queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue()

    def push(self, event: StoredEvent) -> None:
        if self.queue.qsize() < MAX_BACKLOG:
            self.queue.put_nowait(event)
        elif self.queue.qsize() == MAX_BACKLOG:
            self.queue.put_nowait(None)


class EventFeed:
    def __init__(
        self,
        engine: Engine,
        *,
        poll_interval: float,
        on_finished: Callable[[str], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        """``on_finished``: called with each ``job_finished`` payload; ``on_reconnect``: after the
        listener was lost (a finish may have gone unheard)."""
        self.engine = engine
        self.poll_interval = poll_interval
        self.listening = engine.dialect.name == "postgresql"
        self._on_finished = on_finished
        self._on_reconnect = on_reconnect
        self._by_job: dict[str, set[Subscription]] = defaultdict(set)
        self._by_tenant: dict[str, set[Subscription]] = defaultdict(set)
        self._high = 0
        self._missing: dict[int, float] = {}  # sequence number -> when it was first missed
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._raw: Any = None  # the LISTEN connection (SQLAlchemy pool record)
        self._fd: int | None = None

    async def start(self) -> None:
        """Read the current high-water mark (streams started later read their history themselves)
        and start reading; call from the app's lifespan."""
        self._high = await run_in_threadpool(self._last_seq)
        self._tasks.append(asyncio.create_task(self._read_loop(), name="event-feed"))
        if self.listening:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="event-feed-listen"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._drop_listener()

    def subscribe(self, *, job_id: str | None = None, tenant_id: str | None = None) -> Subscription:
        """Live events of one job, or of all of a tenant's jobs. Subscribe before reading the
        history, so nothing falls between the two (an event may then come both ways)."""
        sub = Subscription(job_id, tenant_id)
        if job_id is not None:
            self._by_job[job_id].add(sub)
        elif tenant_id is not None:
            self._by_tenant[tenant_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        for index, key in ((self._by_job, sub.job_id), (self._by_tenant, sub.tenant_id)):
            if key is not None and key in index:
                index[key].discard(sub)
                if not index[key]:
                    del index[key]

    @property
    def streams(self) -> int:
        return sum(map(len, self._by_job.values())) + sum(map(len, self._by_tenant.values()))

    def wake(self) -> None:
        """Read now (something was just written)."""
        self._wake.set()

    # -- reading -----------------------------------------------------------------------------

    def _last_seq(self) -> int:
        with self.engine.connect() as conn:
            return history.last_seq(conn)

    def _scan(self, jobs: list[str], tenants: list[str]) -> history.Scan:
        with self.engine.connect() as conn:
            return history.scan(conn, self._high, list(self._missing), jobs=jobs, tenants=tenants)

    def _late(self, found: history.Scan, jobs: list[str], tenants: list[str]) -> list[StoredEvent]:
        with self.engine.connect() as conn:
            return history.found_events(conn, found, jobs=jobs, tenants=tenants)

    async def _read_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            jobs, tenants = set(self._by_job), set(self._by_tenant)
            try:
                found = await run_in_threadpool(self._scan, list(jobs), list(tenants))
                self._advance(found)
                for event in found.events:
                    self._dispatch(event)
                # Streams that subscribed while the scan ran may have read their history before
                # an event this scan found committed: read those events again for them alone.
                late_jobs, late_tenants = set(self._by_job) - jobs, set(self._by_tenant) - tenants
                if found.found_any and (late_jobs or late_tenants):
                    late = await run_in_threadpool(self._late, found, list(late_jobs), list(late_tenants))
                    for event in late:
                        self._dispatch(event, jobs=late_jobs, tenants=late_tenants)
            except Exception as exc:  # the database is away: streams stay open, the next read catches up
                log.warning("event feed: %s", exc)
                await asyncio.sleep(self.poll_interval)
                continue
            if found.full:
                self._wake.set()

    def _advance(self, found: history.Scan) -> None:
        now = time.monotonic()
        self._high = found.high
        # A number missing this long was rolled back (a refused submit, say), not slow to commit.
        since = ((s, self._missing.get(s, now)) for s in found.missing)
        missing = {s: t for s, t in since if now - t <= MISSING_GRACE}
        if len(missing) > MAX_MISSING:
            missing = dict(sorted(missing.items())[-MAX_MISSING:])
        self._missing = missing

    def _dispatch(
        self, event: StoredEvent, *, jobs: set[str] | None = None, tenants: set[str] | None = None
    ) -> None:
        """To the streams of the event's job and tenant (only those in ``jobs``/``tenants`` if given)."""
        if jobs is None or event.job_id in jobs:
            for sub in self._by_job.get(event.job_id, ()):
                sub.push(event)
        if tenants is None or event.tenant_id in tenants:
            for sub in self._by_tenant.get(event.tenant_id, ()):
                sub.push(event)

    # -- listening ---------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            lost = asyncio.Event()
            try:
                self._raw = await run_in_threadpool(
                    listening_connection, self.engine, JOB_EVENTS_CHANNEL, JOB_FINISHED_CHANNEL
                )
                conn = self._raw.driver_connection
                self._fd = conn.fileno()
                loop.add_reader(self._fd, self._on_readable, conn, lost)
                self._wake.set()  # catch up on what happened while not listening
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event feed listener: %s; reconnecting", exc)
            self._drop_listener()
            if self._on_reconnect is not None:
                self._on_reconnect()
            await asyncio.sleep(1.0)

    def _on_readable(self, conn: Any, lost: asyncio.Event) -> None:
        try:
            conn.poll()
        except Exception as exc:
            log.warning("event feed listener lost: %s", exc)
            lost.set()
            return
        while conn.notifies:
            notice = conn.notifies.pop(0)
            if notice.channel == JOB_FINISHED_CHANNEL and self._on_finished is not None:
                self._on_finished(notice.payload)
        self._wake.set()

    def _drop_listener(self) -> None:
        raw, self._raw, fd, self._fd = self._raw, None, self._fd, None
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.invalidate()
