"""Cancellations pushed to the worker: PostgreSQL NOTIFY on ``job_canceled`` (sent in the cancel's
transaction) wakes the job's watcher at once, so a running job stops at its next denoising step
rather than at the watcher's next poll. Polling stays as the fallback (SQLite, a lost connection)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
from typing import Any

from sqlalchemy import Engine

from inference_server.db.base import listening_connection
from inference_server.events import JOB_CANCELED_CHANNEL

log = logging.getLogger(__name__)


class CancelListener:
    """One LISTEN connection for a worker child, used by one job's watcher at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._raw: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def wait(self, job_id: str, timeout: float) -> bool:
        """Block up to ``timeout`` seconds or until woken; return whether ``job_id`` was canceled."""
        try:
            conn = self._connection()
            ready = select.select([conn, self._wake_r], [], [], timeout)[0]
            if self._wake_r in ready:
                os.read(self._wake_r, 512)
            if conn not in ready:
                return False
            conn.poll()
            canceled = {n.payload for n in conn.notifies}
            conn.notifies.clear()
            return job_id in canceled
        except Exception as exc:  # the watcher falls back to polling until the next connect
            log.warning("cancel listener: %s", exc)
            self._drop()
            select.select([self._wake_r], [], [], timeout)
            return False

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is in place (else cancels are seen only by polling)."""
        return self._raw is not None

    def listen(self) -> None:
        """Put the LISTEN in place now, before the job can be canceled (a NOTIFY sent earlier is
        not delivered). If it cannot be, ``wait`` retries and the watcher polls meanwhile."""
        try:
            self._connection()
        except Exception as exc:
            log.warning("cancel listener: %s", exc)
            self._drop()

    def wake(self) -> None:
        """End a ``wait`` early (the job is over)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _connection(self) -> Any:
        if self._raw is None:
            self._raw = listening_connection(self.engine, JOB_CANCELED_CHANNEL)
        return self._raw.driver_connection

    def _drop(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.invalidate()
            self._raw = None
