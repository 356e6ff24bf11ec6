"""Wakes the scheduler when a worker slot frees. A relay with no free slot for any waiting job
would otherwise wait its whole interval, and a worker that finished denoising would find no next
message ready (its early resume takes the next one as the last step begins, so it must be queued
by then). Workers NOTIFY ``job_slots`` when a job's denoising ends, and every job's end NOTIFYs
``job_finished``; one LISTEN connection per relay hears both. Without PostgreSQL, or while the
connection is down, the relay falls back to its interval."""

from __future__ import annotations

import logging
import select
import threading
from typing import Any

from sqlalchemy import Engine

from inference_server.db.base import listening_connection
from inference_server.events import JOB_FINISHED_CHANNEL, JOB_SLOTS_CHANNEL

log = logging.getLogger(__name__)


class SlotListener:
    """A daemon thread that sets every event of ``freed`` on each ``job_slots`` or ``job_finished``
    notice."""

    def __init__(self, engine: Engine, *freed: threading.Event, check_every: float = 5.0) -> None:
        self.engine = engine
        self.freed = freed
        self.check_every = check_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-listener", daemon=True)

    def start(self) -> SlotListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.check_every + 1)

    def _run(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            raw: Any = None
            try:
                raw = listening_connection(self.engine, JOB_SLOTS_CHANNEL, JOB_FINISHED_CHANNEL)
                pause = 1.0
                self._hear(raw.driver_connection)
            except Exception as exc:  # the interval covers for it until the next connect
                log.warning("slot listener: %s; the relay polls meanwhile", type(exc).__name__)
                self._stop.wait(pause)
                pause = min(pause * 2, 30.0)
            finally:
                if raw is not None:
                    raw.invalidate()  # a LISTENing connection never goes back to the pool

    def _hear(self, conn: Any) -> None:
        while not self._stop.is_set():
            if not select.select([conn], [], [], self.check_every)[0]:
                continue
            conn.poll()
            if conn.notifies:
                conn.notifies.clear()
                for event in self.freed:
                    event.set()
