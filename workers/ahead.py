"""Claiming the next job while the current one's last steps run.

A run begins with its claim (a locked read and a committed write), then reads its inputs and starts
its side thread, and the device waits through all of it. But the next job is known earlier: as a
job nears its end, the gate resumes consumption (workers/gate.py), so the next message reaches the
worker's main process before the child is free, and the main process passes its job id down a pipe
to the child. How near: as the last step begins, or earlier by ``lead``, a little more than the
slowest of the recent claims ahead took from that moment (a broker delivery and the main process's
dispatch vary from one job to the next, and a mean is late half the time), so that the next job is
ready as the device frees.
This module's thread then claims that job, reads its inputs and starts its watcher, and when the
message's task reaches the child, the run takes what was prepared and goes straight to the device.

The database still decides what runs: the claim ahead is the runner's own claim, committed before
the run relies on it; a job canceled meanwhile is seen by its watcher (its cancel pushed by the
child's listener like any running job's), and its run ends canceled. A prepared job whose task does
not come (the main process handed its message back to the broker, or lost its connection) is given
back, queued again with its attempt not counted, as soon as the child starts another job or after
``hold`` seconds. A child that dies holding one leaves a lease, which the reconciler finds like any
other run's."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.priority import yield_to_device

if TYPE_CHECKING:
    from inference_server.jobs.transitions import Claim
    from workers.progress import ProgressWatcher

log = logging.getLogger(__name__)

FIRST_LEAD = 0.1  # seconds: a claim ahead's time until one has been timed
RECENT = 8  # the claims ahead whose slowest sets the lead
MARGIN = 1.25  # the lead over that slowest claim
# A run tells the gate at most this long before its end, however slow claims get: the message
# it brings is held by this worker, not another, that long before its device can take it.
MAX_LEAD = 0.5
# A claim ahead this long after the gate was told followed an idle queue (no message came while the
# run ended), not a delivery racing the run's last steps: it says nothing of the lead needed.
IDLE = 10 * MAX_LEAD


@dataclass
class Prepared:
    """A job claimed ahead of its run: the claim (written and committed: ``recorded`` is done),
    the engine's request (or the error reading its inputs raised, for the run to fail the job
    with), its watcher, running, and the members of its batch, claimed too where the registry
    batches its model."""

    claim: Claim
    recorded: Future[None]
    watcher: ProgressWatcher
    queue: str
    request: Any = None
    error: Exception | None = None
    previews: Any = None  # workers.previews.LatestPreview of the job, when it asked for previews
    members: list[Any] = field(default_factory=list)  # its batch's other jobs (workers.batching.Member)
    at: float = field(default_factory=time.monotonic)

    def engine_request(self) -> Any:
        """The request, or the error that reading its inputs raised (its watcher is stopped)."""
        if self.error is not None:
            self.watcher.stop()
            raise self.error
        return self.request


Prepare = Callable[[str, str], "Prepared | None"]  # (job id, queue): claimed ahead, or None
GiveBack = Callable[[Prepared], None]


class AheadClaims:
    """The child's claims made ahead of their runs, at most one or two at a time.

    ``prepare`` claims a job and readies its run (None: not claimed, the run claims as usual);
    ``give_back`` returns a prepared job that will not run here to its queue. Both are the
    runner's, and ``prepare`` runs on this object's thread."""

    def __init__(
        self, prepare: Prepare, give_back: GiveBack, *, hold: float, room: Callable[[], bool] = lambda: True
    ) -> None:
        self._prepare = prepare
        self._give_back = give_back
        self.hold = hold
        self._room = room
        self._lock = threading.Lock()
        self._claims: dict[str, Future[Prepared | None]] = {}
        self._unwanted: dict[str, threading.Event] = {}  # claims waiting for room, until their run begins
        self._begun: deque[str] = deque(maxlen=64)  # runs that began without a claim ahead
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lead = FIRST_LEAD  # seconds from telling the gate to a prepared claim (see _learn)
        self._took: deque[float] = deque(maxlen=RECENT)
        self._told_at: float | None = None

    def offer(self, job_id: str, queue: str) -> None:
        """Claim ``job_id`` now, unless its run has begun or it is claimed already. While there is
        no ``room`` (the finisher is full: the current job will wait for a slot before the next
        can begin) the claim waits, so a job does not show running while it waits on storage; if
        the job's run begins meanwhile, the run claims it."""
        with self._lock:
            if self._stop.is_set() or job_id in self._begun or job_id in self._claims:
                return  # closed: the child exits, and holds no claim it would leave to a lease
            claimed: Future[Prepared | None] = Future()
            self._claims[job_id] = claimed
            unwanted = self._unwanted[job_id] = threading.Event()
        prepared = None
        if self._wait_for_room(unwanted):
            try:
                prepared = self._prepare(job_id, queue)
            except Exception as exc:  # the run claims the job itself, as without this module
                log.warning("job %s: not claimed ahead: %s", job_id, exc)
        with self._lock:
            self._unwanted.pop(job_id, None)
        claimed.set_result(prepared)
        self._learn()
        if prepared is None:
            with self._lock:
                if self._claims.get(job_id) is claimed:
                    del self._claims[job_id]
        else:
            log.info("job %s: claimed ahead of its run", job_id)

    def told(self) -> None:
        """The run told the gate it nears its end: the next offer's claim is timed from now."""
        with self._lock:
            self._told_at = time.monotonic()

    def _learn(self) -> None:
        """Time this claim from the gate being told, and set ``lead`` from the slowest recent
        ones: the next run tells the gate that much before its end, so its next job is ready as
        its device frees."""
        with self._lock:
            told, self._told_at = self._told_at, None
            if told is None or (took := time.monotonic() - told) > IDLE:
                return
            self._took.append(took)
            self.lead = min(MARGIN * max(self._took), MAX_LEAD)

    def take(self, job_id: str) -> Prepared | None:
        """What was prepared for ``job_id``, once its claim ahead is done (None: there is none,
        and none will be made: the run claims the job itself). Any other job prepared ahead will
        not run next, so it is given back."""
        with self._lock:
            claimed = self._claims.pop(job_id, None)
            if claimed is None:
                self._begun.append(job_id)
            elif job_id in self._unwanted:
                self._unwanted[job_id].set()  # still waiting for room: the run claims it now
            stale = [self._claims.pop(other) for other in list(self._claims) if self._claims[other].done()]
        for other in stale:
            self._release(other.result())
        return claimed.result() if claimed is not None else None

    def read_from(self, fd: int) -> None:
        """Take offers from ``fd`` (lines of ``job_id queue``, written by the worker's main
        process) on a thread of this object's own, and give back what waits past ``hold``."""
        self._thread = threading.Thread(target=self._read, args=(fd,), name="claim-ahead", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Give back every job prepared and not taken (the child is exiting)."""
        with self._lock:
            self._stop.set()
            held = [self._claims.pop(job_id) for job_id in list(self._claims)]
        for claimed in held:
            with contextlib.suppress(Exception):
                self._release(claimed.result(timeout=30))

    def _wait_for_room(self, unwanted: threading.Event) -> bool:
        deadline = time.monotonic() + self.hold
        while not self._room():
            # Polled: the finisher frees a slot once per stored call, and only while it is full.
            if unwanted.wait(0.01) or self._stop.is_set() or time.monotonic() > deadline:
                return False
        return True

    def _read(self, fd: int) -> None:
        yield_to_device()
        pending = b""
        while not self._stop.is_set():
            try:
                ready = select.select([fd], [], [], max(self.hold / 4, 0.05))[0]
                if self._stop.is_set():
                    return  # what is in the pipe is for the child that replaces this one
                if ready:
                    pending += os.read(fd, 4096)
            except OSError as exc:
                log.warning("claims ahead stop: %s", exc)
                return
            *lines, pending = pending.split(b"\n")
            for line in lines:
                job_id, _, queue = line.decode(errors="replace").partition(" ")
                if job_id:
                    self.offer(job_id, queue)
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                job_id
                for job_id, claimed in self._claims.items()
                if claimed.done() and (p := claimed.result()) is not None and now - p.at > self.hold
            ]
            expired = [self._claims.pop(job_id) for job_id in due]
        for claimed in expired:
            self._release(claimed.result())

    def _release(self, prepared: Prepared | None) -> None:
        if prepared is None:
            return
        log.info("job %s: claimed ahead, not run here; giving it back", prepared.claim.job_id)
        try:
            self._give_back(prepared)
        except Exception as exc:  # its lease then runs out and the reconciler queues it again
            log.error("job %s: not given back: %s", prepared.claim.job_id, exc)
