"""A per-job side thread that saves progress and watches for cancellation, so the denoising loop
only reads and writes two attributes per step and never waits on the database."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Job
from inference_server.db.base import utcnow
from inference_server.events import emit_progress
from inference_server.jobs.status import JobStatus
from workers.cancels import CancelListener

log = logging.getLogger(__name__)


class ProgressWatcher:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: str,
        attempt: int,
        *,
        progress_interval: float,
        poll_interval: float,
        api_base: str,
        after: Future[None] | None = None,
        cancels: CancelListener | None = None,
    ) -> None:
        """``after``: the job's claim being committed; the watcher starts once it is, and stops the
        run if it fails. ``cancels``: pushed cancellations, checked between polls."""
        self._sf = session_factory
        self.job_id = job_id
        self.attempt = attempt
        self.progress_interval = progress_interval
        self.poll_interval = poll_interval
        self.api_base = api_base
        self.canceled = False
        self.superseded = False  # stopped because a newer attempt owns the job
        self._after = after
        self._cancels = cancels
        self._step = 0
        self._total = 0
        self._started = time.monotonic()
        self._written_step = 0
        self._last_write = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{job_id[:8]}", daemon=True)

    def __enter__(self) -> ProgressWatcher:
        if self._cancels is not None:
            self._cancels.listen()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._cancels is not None:
            self._cancels.wake()
        self._thread.join(timeout=10)

    def on_step(self, step: int, total: int) -> bool:
        """The engine's per-step callback: record, and answer whether to stop."""
        self._step, self._total = step, total
        return self.canceled

    def _loop(self) -> None:
        if self._after is not None:
            try:
                self._after.result()
            except Exception:
                self.canceled = True  # the runner re-raises the claim's failure
                return
        while not self._pause():
            try:
                self._tick()
            except Exception:  # a side channel never fails the job
                log.exception("progress update for job %s failed", self.job_id)

    def _pause(self) -> bool:
        """Wait for the next tick: a poll interval, or less when a cancel of this job is pushed.
        Return whether the watcher is to stop."""
        if self._cancels is None:
            return self._stop.wait(self.poll_interval)
        self._cancels.wait(self.job_id, self.poll_interval)
        return self._stop.is_set()

    def _tick(self) -> None:
        now = time.monotonic()
        step, total = self._step, self._total
        write = step != self._written_step and now - self._last_write >= self.progress_interval
        with self._sf() as session:
            row = session.execute(select(Job.status, Job.attempts).where(Job.id == self.job_id)).first()
            if row is None or row.status != JobStatus.RUNNING or row.attempts != self.attempt:
                # Canceled, or taken over by a newer attempt (this worker lost the broker, or
                # outlived its delivery timeout): either way this run's result is not wanted.
                self.superseded = row is not None and row.status == JobStatus.RUNNING
                self.canceled = True
                return
            if not write or not total:
                return
            elapsed = now - self._started
            eta = elapsed / step * (total - step) if step else None
            result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING, Job.attempts == self.attempt)
                .values(progress_step=step, progress_total=total, eta_seconds=eta, updated_at=utcnow())
            )
            if result.rowcount:
                job = session.get(Job, self.job_id)
                if job is not None:
                    emit_progress(session, job, api_base=self.api_base)
            session.commit()
        self._written_step, self._last_write = step, now
