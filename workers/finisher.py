"""Finishing a job while the next one denoises.

When a job's denoising ends, its run hands the images to the worker child's ``Finisher`` and the
job task returns, so the worker takes its next job at once; the finisher's thread encodes, signs,
uploads and records the finished run meanwhile. The GPU does not wait for storage.

Bounded: at most ``in_flight`` hand-offs are held (queued or being finished), each the runs of one
pipeline call: a job, or a batch's members, which are finished together (stored at once, their
successes recorded in one transaction). A hand-off beyond that waits in the job task, so the worker
takes no further job until a call's runs are recorded: a slow store slows intake instead of piling
up images in memory.

Nothing is lost when the child dies with runs in flight: each run's job is still ``running`` in the
database under a lease its watcher renews until the end is recorded, so the reconciler re-queues it
once the lease expires. A child that exits on purpose (warm shutdown, recycling) drains first.

The interface other modules use: build a ``FinishedRun`` (a claimed job, its images and the watcher
that holds its lease) for each job of a call and ``submit`` them. The images are in the order of
the job's seeds."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge

from inference_server.jobs.enums import RunOutcome
from inference_server.logs import job_context
from workers.priority import yield_to_device

if TYPE_CHECKING:
    from PIL import Image

    from inference_server.jobs.transitions import Claim
    from workers.progress import ProgressWatcher

log = logging.getLogger(__name__)

IN_FLIGHT = Gauge(
    "inference_finishing_jobs",
    "Denoised jobs this worker is encoding, uploading or recording, or holds to do so",
    multiprocess_mode="livesum",
)


@dataclass
class FinishedRun:
    """A job whose denoising is over, with everything needed to finish it.

    ``claim``: the job as this attempt claimed it (its claim already committed). ``images``: one per
    seed of ``claim.spec.seeds``, in that order. ``steps``: the denoising steps the engine counted.
    ``queue``: where a transient failure sends the job back. ``watcher``: the job's running
    ProgressWatcher; it keeps the lease alive and sees a cancel until the finisher stops it, just
    before the end is written."""

    claim: Claim
    images: list[Image.Image]
    steps: int
    queue: str
    watcher: ProgressWatcher
    started: float = field(default_factory=time.perf_counter)  # when the run began (metrics)
    extras: Any = None  # workers.runner.Extras: control images, mask, safety verdicts


Finish = Callable[[list[FinishedRun]], list[RunOutcome]]


class Finisher:
    """One thread finishing handed-off calls in order, at most ``in_flight`` held at a time.

    ``finish`` encodes, uploads and records one call's runs and returns their outcomes
    (JobRunner.finish); it must stop the runs' watchers whatever happens. ``in_flight`` must be at
    least 1."""

    def __init__(self, finish: Finish, in_flight: int) -> None:
        if in_flight < 1:
            raise ValueError("a finisher holds at least one run")
        self.limit = in_flight
        self._finish = finish
        self._slots = threading.Semaphore(in_flight)
        self._queue: queue.SimpleQueue[list[FinishedRun] | None] = queue.SimpleQueue()
        self._held = 0
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="finisher", daemon=True)
        self._thread.start()

    @property
    def held(self) -> int:
        """Calls handed off whose runs are not all recorded yet."""
        return self._held

    def submit(self, runs: list[FinishedRun]) -> int:
        """Hand over the runs of one call; blocks while ``in_flight`` calls are held. Returns how
        many are held with this one (at most ``in_flight``)."""
        self._slots.acquire()
        with self._lock:
            if not self._thread.is_alive():
                self._slots.release()
                raise RuntimeError("the finisher has stopped")
            self._held += 1
            held = self._held
        IN_FLIGHT.inc(len(runs))
        self._queue.put(runs)
        return held

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every run handed over is recorded; return whether that happened in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._held:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Drain, then stop the thread. Return whether every run was recorded in time."""
        drained = self.drain(timeout)
        self._queue.put(None)
        self._thread.join(timeout if drained else 0)
        return drained

    def _loop(self) -> None:
        yield_to_device()
        while (runs := self._queue.get()) is not None:
            try:
                # One job's lines name it; a batch's shared lines name its jobs themselves.
                with run_context(runs[0]) if len(runs) == 1 else contextlib.nullcontext():
                    outcomes = self._finish(runs)
                for run, outcome in zip(runs, outcomes, strict=True):
                    with run_context(run):
                        log.info("job %s: %s, recorded by the finisher", run.claim.job_id, outcome.value)
            except Exception:  # a bug: the jobs' leases run out and the reconciler re-runs them
                for run in runs:
                    with run_context(run):
                        log.exception("job %s: finishing failed", run.claim.job_id)
                    run.watcher.stop()
            finally:
                with self._lock:
                    self._held -= 1
                    self._lock.notify_all()
                IN_FLIGHT.dec(len(runs))
                self._slots.release()


def run_context(run: FinishedRun) -> Any:
    """The log context of ``run``'s job: every line logged inside names it."""
    claim = run.claim
    return job_context(
        job_id=claim.job_id,
        tenant=str(claim.row.get("tenant_id")),
        family=claim.family,
        attempt=claim.attempt,
    )
