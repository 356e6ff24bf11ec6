"""The worker holds no unacknowledged message while a job runs.

RabbitMQ closes a channel whose delivery stays unacknowledged past its consumer timeout (30 minutes
by default; per queue only on 3.12+), which killed workers on long jobs and ran those jobs twice.
So a job's message is acknowledged as its run starts, and the job is then carried by its lease in
the database (see ``jobs.reconcile``). Acknowledging early would let the broker deliver the next
message at once, to wait unacknowledged in this worker behind the running job: so consumption is
paused first (``basic.cancel``, confirmed by the broker before the ack goes out, while the prefetch
of one still holds back any further delivery) and resumed when the job's run ends.

It is resumed a little earlier, as the job nears its end (as its last denoising step begins, or
as early before its end as the child's claims ahead have been taking, at most half a second): the
child says so through a pipe the main process watches (``ending``), so the next message's delivery
(a broker round trip and Celery's dispatch) overlaps the job's last steps instead of leaving the
GPU idle after them. That message then waits unacknowledged for that long at most (for a run that
stops because it was canceled, until its current step ends), far inside any consumer timeout.

That message's job id also goes down a second pipe, to the child (``announce``): the child claims
the job and reads its inputs meanwhile (workers/ahead.py), so the next run starts on the device the
moment its task arrives."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from typing import Any

from celery import bootsteps, signals
from celery.worker import state
from celery.worker.request import Request

from inference_server.publish.topology import DEAD_QUEUE, RUN_JOB
from workers.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)


class _Gate:
    """The worker main process's task consumer, paused while its one job runs."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.holder: Any = None  # the request whose run paused consumption
        # Made before the pool forks: children write job ids, the main process reads them.
        self._ending_r, self._ending_w = os.pipe()
        os.set_blocking(self._ending_r, False)
        os.set_blocking(self._ending_w, False)
        # The other way: the main process names the next job, the child claims it ahead.
        self.next_r, self._next_w = os.pipe()
        os.set_blocking(self._next_w, False)
        self.ahead = False  # set for a prefork pool: with the solo pool nothing reads next_r
        self._announcing = True  # the next job message is the one the child runs next
        self.closing = False  # a warm shutdown began: consumption stays paused
        self._early: deque[str] = deque(maxlen=8)  # endings heard before their run's acceptance

    def announce(self, request: Any) -> None:
        """In the main process: a job message arrived. The first one since consumption resumed
        is the child's next run: its job id and queue go to the child. Never blocks or raises."""
        if not self.ahead or not self._announcing or getattr(request, "name", None) != RUN_JOB:
            return
        self._announcing = False
        try:
            job_id = request.args[0]
            queue = (request.delivery_info or {}).get("routing_key") or ""
        except (IndexError, TypeError, AttributeError):
            return
        if isinstance(job_id, str) and " " not in job_id and "\n" not in job_id:
            with contextlib.suppress(OSError):  # a full pipe: the run claims the job itself
                os.write(self._next_w, f"{job_id} {queue}\n".encode())

    def ending(self, job_id: str) -> None:
        """In the child: ``job_id`` nears its end (its last denoising steps run). Never blocks or raises."""
        with contextlib.suppress(OSError):
            os.write(self._ending_w, f"{job_id}\n".encode())  # under PIPE_BUF: written whole

    def watch_endings(self, hub: Any) -> None:
        """In the main process: resume consumption when the running job's child says it is ending."""
        if hub is not None:
            hub.add_reader(self._ending_r, self._on_ending)

    def _on_ending(self, *_: Any) -> None:
        try:
            said = os.read(self._ending_r, 4096).decode(errors="replace").split()
        except OSError:
            return
        holder = self.holder
        if holder is not None and holder.id in said:
            self.resume(holder)
        elif holder is None:
            # An early word: a short run can near its end before this process has seen its child
            # accept it (``accepted`` then resumes at once, rather than at the run's end). While a
            # run holds the gate, any other job's word is a late one about an earlier run: kept,
            # it would resume at once a later run of that job (a retry here), however long.
            self._early.extend(said)

    def accepted(self, request: Any) -> None:
        """In the main process: ``request``'s run has paused consumption and been acknowledged.
        If its child already said it nears its end, resume now."""
        if request.id in self._early:
            self._early.clear()
            self.resume(request)

    def pause(self, request: Any) -> None:
        """Stop deliveries for the run of ``request``, and hand back what was delivered already."""
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if task_consumer is None or self.holder is not None:
            return
        self.holder = request
        self._announcing = False
        try:
            task_consumer.cancel()
        except Exception as exc:  # the connection is gone; its deliveries return to the queue anyway
            log.warning("could not pause consuming: %s", exc)
        # Quorum queues apply the prefetch per consumer, so a worker of several families may hold
        # one message of each other family: back to the broker, for an idle worker to take.
        for other in list(state.reserved_requests):
            if other is not request and other.worker_pid is None and not other.acknowledged:
                other.reject(requeue=True)

    def resume(self, request: Any) -> None:
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if request is not self.holder:
            return
        self.holder = None
        self._early.clear()  # words heard during that run were about earlier ones
        if self.closing:
            return
        self._announcing = True
        if task_consumer is None:
            return
        try:
            task_consumer.consume()
        except Exception as exc:  # the connection is gone: Celery's reconnect starts consuming again
            log.warning("could not resume consuming: %s", exc)

    def close(self) -> None:
        """In the main process: a warm shutdown began. Celery still receives messages while its
        last run ends, and never runs them: resuming would bring one in for nothing, and announce
        it to the child, which would claim it ahead only to give it back (the job seen started
        twice). So consumption stays paused to the end."""
        self.closing = True
        self._announcing = False


GATE = _Gate()


class GateStep(bootsteps.StartStopStep):
    """Gives the gate the consumer once its task consumer exists, and declares ``jobs.dead``."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        GATE.consumer = c
        GATE.holder = None  # a new connection consumes afresh
        GATE.watch_endings(getattr(c, "hub", None))
        with contextlib.suppress(Exception):
            DEAD_QUEUE.bind(c.connection.default_channel).declare()


class LeasedRequest(Request):
    """A job message: acknowledged as its run starts, consumption paused until the run ends.

    Celery builds a subclass of this per task that overrides ``execute_using_pool`` and
    ``on_success`` without calling up, so the end of a run is seen where both of its paths go:
    ``acknowledge`` (success, with ``acks_late``) and ``on_failure``."""

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        GATE.pause(self)
        Request.acknowledge(self)  # the run's own ack, not its end
        GATE.accepted(self)
        super().on_accepted(pid, time_accepted)

    def acknowledge(self) -> None:
        super().acknowledge()
        GATE.resume(self)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        try:
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            GATE.resume(self)


@signals.task_received.connect
def _announce(request: Any = None, **_: Any) -> None:
    GATE.announce(request)


@signals.worker_shutting_down.connect
def _closing(**_: Any) -> None:
    GATE.close()


@signals.task_rejected.connect
def _count_rejected(message: Any = None, exc: Exception | None = None, **_: Any) -> None:
    # Celery rejects (to the dead-letter exchange) a message of no known task or format.
    DEAD_LETTERS.labels("unknown_message").inc()
