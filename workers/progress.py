"""A per-job side thread that saves progress, renews the job's lease and watches for cancellation,
so the denoising loop only reads and writes two attributes per step and never waits on the database.

A run that cannot renew its lease (the database is down or unreachable from this worker) stops once
the lease it last renewed has run out: by then the reconciler may have given the job to another
worker, and this run's result would be refused anyway."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db import Job
from inference_server.db.base import utcnow
from inference_server.events import emit_preview, emit_progress, notify_slot_freed
from inference_server.jobs.enums import JobStatus
from workers.cancels import CancelListener
from workers.previews import LatestPreview
from workers.priority import yield_to_device

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
        lease_seconds: float = 30.0,
        after: Future[None] | None = None,
        cancels: CancelListener | None = None,
        previews: LatestPreview | None = None,
    ) -> None:
        """``after``: the job's claim being committed; the watcher starts once it is, and stops the
        run if it fails. ``cancels``: the child's listener, which pushes this job's cancels: while it
        listens, the row is read only when something is due (else it is polled). ``previews``: the
        run's previews, stored and announced (``job.preview``) at most every ``progress_interval``."""
        self._sf = session_factory
        self.job_id = job_id
        self.attempt = attempt
        self.progress_interval = progress_interval
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.canceled = False
        self.superseded = False  # stopped because a newer attempt owns the job
        # Called once, on the watcher's thread, when it finds the run unwanted (canceled, taken
        # over, its lease run out): the run stops at its next step, so the runner lets the gate
        # bring in the next message while that step ends (``when_unwanted``).
        self._on_unwanted: Callable[[], object] | None = None
        self._hook_lock = threading.Lock()  # set on the run's thread, taken on the watcher's
        self._after = after
        self._cancels = cancels
        self._previews = previews
        self._last_preview = 0.0
        # The runner's last flush and the watcher's tick both store and announce: one at a time,
        # so previews are stored and announced in the order of their steps.
        self._preview_lock = threading.Lock()
        self._step = 0
        self._total = 0
        self._started = time.monotonic()
        self._renewed = self._started  # the claim took the lease
        self._lease_until = self._started + lease_seconds
        self._written_step = 0
        # Throttled from the start: a run shorter than ``progress_interval`` writes its progress once,
        # as its denoising ends, rather than a transaction more per job (on the device's interpreter).
        self._last_write = self._started
        self._final = False  # denoising over
        self._announce = False  # ... and its last step is written at once, the slot told free
        self._told = False  # the scheduler was told this job's slot is free
        self._check = True  # read the job's row at the next tick, even with nothing to write
        self._stop = threading.Event()
        self._nudge = threading.Event()  # ends a pause early: the run stopped or its denoising ended
        self._thread = threading.Thread(target=self._loop, name=f"progress-{job_id[:8]}", daemon=True)

    def __enter__(self) -> ProgressWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ProgressWatcher:
        """Start watching (the lease is renewed, progress saved, cancels seen) until ``stop``."""
        if self._cancels is not None:
            self._cancels.subscribe(self.job_id, self._pushed)
        self._thread.start()
        return self

    def _pushed(self) -> None:
        """The listener's call: this job was canceled (or a cancel may have been missed)."""
        self._check = True
        self._nudge.set()

    def stop(self, *, wait: bool = True) -> None:
        """Stop watching; returns once the watcher has made its last write (``wait=False``: at
        once, so that several watchers stop together). Idempotent."""
        self._stop.set()
        self._nudge.set()
        if self._cancels is not None:
            self._cancels.unsubscribe(self.job_id)
        if wait and self._thread.is_alive():
            self._thread.join(timeout=10)

    def denoised(self, *, announce: bool = True) -> None:
        """The job's denoising is over: write the last step now rather than at the next throttled
        tick, with a NOTIFY on ``job_slots``: the scheduler counts a job whose last step is
        recorded as out of its worker's slot (it is being finished beside the next one), so the
        slot's next message goes out at once. A cancel from now on can only spare the upload.
        ``announce=False``: another job of its batch does that for the call they shared (the job's
        own end writes its last step), saving a transaction per member."""
        self._final = True
        self._announce = announce
        self._nudge.set()

    def flush_preview(self) -> None:
        """Store and announce the run's last preview now (its denoising is over), so a run quicker
        than the throttle still shows it before its end is written. Never raises."""
        if self._previews is None or self.canceled:
            return
        try:
            self._preview_tick(force=True)
        except Exception as err:
            log.warning("preview of job %s failed: %s", self.job_id, err)

    @property
    def total(self) -> int:
        """The steps of the run as the engine last counted them (0 before its first step)."""
        return self._total

    def on_step(self, step: int, total: int) -> bool:
        """The engine's per-step callback: record, and answer whether to stop."""
        self._step, self._total = step, total
        return self.canceled

    def _loop(self) -> None:
        yield_to_device()
        if self._after is not None:
            try:
                self._after.result()
            except Exception:
                self.canceled = True  # the runner re-raises the claim's failure
                return
        while not self._pause():
            try:
                self._tick()
                self._preview_tick()
            except Exception as exc:  # a side channel never fails the job
                log.warning("progress update for job %s failed: %s", self.job_id, exc)
            if time.monotonic() > self._lease_until and not self.canceled:
                log.warning("job %s: lease not renewed in time; stopping this run", self.job_id)
                self.superseded = self.canceled = True
                self._unwanted()
                return
            if self.canceled:
                self._unwanted()

    def when_unwanted(self, hook: Callable[[], object] | None) -> None:
        """Call ``hook`` once if the watcher finds the run unwanted from now on (None: no more)."""
        with self._hook_lock:
            self._on_unwanted = hook

    def _unwanted(self) -> None:
        with self._hook_lock:
            hook, self._on_unwanted = self._on_unwanted, None  # once
        if hook is None:
            return
        try:
            hook()
        except Exception as exc:  # a side channel never fails the job
            log.warning("job %s: the end of an unwanted run not told: %s", self.job_id, exc)

    def _pause(self) -> bool:
        """Wait for the next tick: a poll interval, or less when nudged (a pushed cancel, the end
        of the denoising, a stop). Return whether the watcher is to stop."""
        # Denoised and polled: a cancel can only spare the upload now, so the row is read less often.
        polled = self._cancels is None or not self._cancels.listening
        slower = max(self.poll_interval, self.progress_interval)
        self._nudge.wait(slower if self._final and polled else self.poll_interval)
        self._nudge.clear()
        return self._stop.is_set()

    def _preview_tick(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._previews is None or self.canceled:
            return
        if not force and now - self._last_preview < self.progress_interval:
            return
        with self._preview_lock:
            latest = self._previews.take()
            if latest is None:
                return
            self._last_preview = now
            self._previews.store(latest[1])  # outside the transaction: storage may be slow
            with self._sf() as session:
                # Locked like every writer of the job's events, so its events commit in sequence order.
                job = session.get(Job, self.job_id, with_for_update=True)
                if job is not None and job.status == JobStatus.RUNNING and job.attempts == self.attempt:
                    emit_preview(session, job, latest[0])
                session.commit()

    def _tick(self) -> None:
        now = time.monotonic()
        step, total = self._step, self._total
        due = self._announce or now - self._last_write >= self.progress_interval
        write = bool(total) and step != self._written_step and due
        renew = now - self._renewed >= self.lease_seconds / 3
        tell = self._announce and not self._told  # the scheduler may publish this slot's next job
        pushed = self._cancels is not None and self._cancels.listening
        if pushed and not (write or renew or tell or self._check):
            # Its cancels are pushed and nothing is due: reading the row would only take the
            # interpreter lock from the denoising loop. (A newer attempt can take over only once
            # the lease runs out, and renewing it reads the row.)
            return
        self._check = False
        with self._sf() as session:
            row = session.execute(select(Job.status, Job.attempts).where(Job.id == self.job_id)).first()
            if row is None or row.status != JobStatus.RUNNING or row.attempts != self.attempt:
                # Canceled, or taken over by a newer attempt (this worker lost the database for
                # longer than its lease): either way this run's result is not wanted.
                self.superseded = row is not None and row.status == JobStatus.RUNNING
                self.canceled = True
                return
            if not write and not renew and not tell:
                return
            values: dict[str, Any] = {}
            if write:
                elapsed = now - self._started
                eta = elapsed / step * (total - step) if step else None
                values.update(progress_step=step, progress_total=total, eta_seconds=eta, updated_at=utcnow())
            if renew:
                values["lease_expires_at"] = utcnow() + timedelta(seconds=self.lease_seconds)
            updated = 0
            if values:
                mine = (Job.id == self.job_id, Job.status == JobStatus.RUNNING, Job.attempts == self.attempt)
                result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                    update(Job).where(*mine).values(**values)
                )
                updated = result.rowcount
            if updated and write:
                job = session.get(Job, self.job_id)
                if job is not None:
                    emit_progress(session, job)
            if tell:
                notify_slot_freed(session, self.job_id)
            session.commit()
        self._told = self._told or tell
        if renew and updated:
            self._renewed, self._lease_until = now, now + self.lease_seconds
        if write:
            self._written_step, self._last_write = step, now
