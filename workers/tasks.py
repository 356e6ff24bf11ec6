"""The job task. Its argument is a job id; everything else is read from the database. The runner it
uses (and with it torch and the pipelines) belongs to the worker child: see workers/child.py."""

from __future__ import annotations

import logging

from celery import Celery, Task

from workers.child import ChildRunner

log = logging.getLogger(__name__)


def register_tasks(app: Celery, lazy: ChildRunner) -> None:
    """Register the job task on ``app`` alone. ``shared=False``: Celery otherwise hands a task to
    every app created later in the process, and a second app would warn DuplicateTaskNameWarning
    and run the first app's callable, with the first app's runner. ``lazy`` is the child's runner."""

    @app.task(name="inference.run_job", bind=True, acks_late=True, max_retries=None, shared=False)
    def run_job(self: Task, job_id: str) -> str:
        from workers.runner import RetryLater

        # A retry of ours resumes a job this worker left running, as a broker redelivery does.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered")) or self.request.retries > 0
        try:
            runner = lazy.get()
        except Exception as exc:
            # This worker cannot run anything (device, registry, storage): the job is not at fault.
            # Put it back on its queue for a healthy worker rather than acking it away.
            log.critical("worker cannot start its engine: %s", exc, exc_info=True)
            raise self.retry(countdown=10, exc=exc) from exc
        try:
            outcome = runner.run(job_id, redelivered=redelivered)
        except RetryLater as exc:
            log.warning("job %s: transient failure, retrying: %s", job_id, exc)
            raise self.retry(countdown=5, exc=exc) from exc
        log.info("job %s: %s", job_id, outcome)
        return outcome
