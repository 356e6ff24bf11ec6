"""The job task. Its argument is a job id; everything else is read from the database. The runner it
uses (and with it torch and the pipelines) belongs to the worker child: see workers/child.py."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery, Task

from inference_server.jobs.enums import ClaimRefusal
from inference_server.logs import job_context
from inference_server.publish.topology import RUN_JOB
from workers import messages
from workers.child import ChildRunner
from workers.runner import ClaimUnavailable

log = logging.getLogger(__name__)


def register_tasks(app: Celery, lazy: ChildRunner) -> None:
    """Register the job task on ``app`` alone. ``shared=False``: Celery otherwise hands a task to
    every app created later in the process, and a second app would warn DuplicateTaskNameWarning
    and run the first app's callable, with the first app's runner. ``lazy`` is the child's runner."""

    @app.task(name=RUN_JOB, bind=True, acks_late=True, shared=False, Request="workers.gate:LeasedRequest")
    def run_job(self: Task, job_id: Any) -> str:
        # Every line logged while this message is handled names its job (the runner adds tenant,
        # family and attempt once its claim has read them).
        with job_context(job_id=job_id if isinstance(job_id, str) else repr(job_id)):
            return _run(self, job_id)

    def _run(self: Task, job_id: Any) -> str:
        # The message was acknowledged as this run started (workers.gate): from here the job's
        # lease carries it, and nothing may leave the job without a way back to its queue.
        queue = (self.request.delivery_info or {}).get("routing_key") or ""
        if not _is_job_id(job_id):
            messages.dead_letter(self.app, {"args": [job_id]}, reason="not_a_job_id", queue=queue)
            return "dead-lettered"
        try:
            runner = lazy.get()
        except Exception as exc:
            # This worker cannot run anything (device, registry, storage): the job is not at fault.
            log.critical("worker cannot start its engine: %s", exc, exc_info=True)
            messages.send_back(self.app, job_id, queue, reason="engine_unavailable", pause=10.0)
            return "sent back"
        try:
            outcome = runner.run(job_id, queue=queue)
        except ClaimUnavailable as exc:
            log.warning("job %s: %s; its message goes back to %s", job_id, exc, queue)
            messages.send_back(self.app, job_id, queue, reason="database_unavailable", pause=2.0)
            return "sent back"
        if outcome == ClaimRefusal.MISSING:
            messages.dead_letter(self.app, {"args": [job_id]}, reason="unknown_job", queue=queue)
        log.info("job %s: %s", job_id, outcome.value)
        return outcome.value


def _is_job_id(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False
