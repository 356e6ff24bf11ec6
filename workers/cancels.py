"""Cancellations pushed to the worker: PostgreSQL NOTIFY on ``job_canceled`` (sent in the cancel's
transaction) wakes the job's watcher at once, so a running job stops at its next denoising step
rather than at the watcher's next poll. Polling stays as the fallback (SQLite, a lost connection).

One LISTEN connection per worker child serves every watcher the child runs (the job denoising, a
batch's members, a job claimed ahead, the jobs being finished), through a thread of its own: a
watcher whose cancels are pushed reads its job's row only when it has something to write, so the
denoising thread does not share the interpreter lock with a poll per job."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from inference_server.db.base import listening_connection
from inference_server.events import JOB_CANCELED_CHANNEL
from workers.priority import yield_to_device

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0  # before the first attempt to LISTEN again; doubled after each failure


class CancelListener:
    """The child's LISTEN connection and the thread that hands each cancel to its job's watcher.

    ``subscribe(job_id, check)``: ``check`` is called (on the listener's thread; it must not block)
    when ``job_id`` is canceled, and for every subscriber when the connection was lost and is back,
    since a NOTIFY sent meanwhile is never delivered: each watcher then reads its row."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._raw: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._connecting = threading.Lock()
        self._stale = False  # a new connection: every subscriber's row is read once
        self._checks: dict[str, Callable[[], None]] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is in place (else cancels are seen only by polling)."""
        return self._raw is not None

    def subscribe(self, job_id: str, check: Callable[[], None]) -> None:
        """Push ``job_id``'s cancels to ``check`` from now on. The LISTEN is in place when this
        returns (a NOTIFY sent earlier is not delivered), unless the database cannot be reached:
        then the watcher polls until the listener's thread connects again."""
        with self._lock:
            self._checks[job_id] = check
        if self._raw is None:
            try:
                self._connect()
            except Exception as exc:
                log.warning("cancel listener: %s", exc)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cancel-listener", daemon=True)
                self._thread.start()
        self._wake()  # the thread's select takes the new connection

    def unsubscribe(self, job_id: str) -> None:
        with self._lock:
            self._checks.pop(job_id, None)

    def close(self) -> None:
        self._closed.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._drop()

    def _loop(self) -> None:
        yield_to_device()
        pause = RECONNECT_SECONDS
        while not self._closed.is_set():
            with self._lock:
                raw, stale, self._stale = self._raw, self._stale, False
                checks = list(self._checks.values()) if stale else []
            for check in checks:  # a new connection: a cancel made before it was not pushed
                check()
            if raw is None:
                # Until a watcher's subscribe connects (it wakes the thread), or it is time to try again.
                if select.select([self._wake_r], [], [], pause)[0]:
                    os.read(self._wake_r, 512)
                if self._closed.is_set():
                    return
                try:
                    self._connect()
                    pause = RECONNECT_SECONDS
                except Exception as exc:
                    if pause == RECONNECT_SECONDS:
                        log.warning("cancel listener: %s; the watchers poll until it is back", exc)
                    pause = min(pause * 2, 30.0)
                continue
            try:
                conn = raw.driver_connection
                ready = select.select([conn, self._wake_r], [], [])[0]
                if self._wake_r in ready:
                    os.read(self._wake_r, 512)
                if conn not in ready:
                    continue
                conn.poll()
                canceled = {n.payload for n in conn.notifies}
                conn.notifies.clear()
            except Exception as exc:  # the watchers poll until the connection is back
                log.warning("cancel listener: %s", exc)
                with self._lock:
                    if self._raw is raw:
                        self._drop()
                continue
            with self._lock:
                checks = [self._checks[job_id] for job_id in canceled if job_id in self._checks]
            for check in checks:
                check()

    def _connect(self) -> None:
        """LISTEN on a new connection unless one is in place. One connection at a time (a watcher's
        ``subscribe`` and the thread may both find none); made outside ``_lock``, which
        ``unsubscribe`` takes, so a watcher stopping never waits on a database that does not answer."""
        with self._connecting:
            if self._raw is not None:
                return
            raw = listening_connection(self.engine, JOB_CANCELED_CHANNEL)
            with self._lock:
                if self._closed.is_set():  # closed meanwhile: nothing will read or drop it
                    raw.invalidate()
                    return
                self._raw, self._stale = raw, True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _drop(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.invalidate()
            self._raw = None
