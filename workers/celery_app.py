"""The Celery application factory. Nothing here touches torch or CUDA: the worker child builds its
engine when it starts, after the launcher has pinned its GPU (workers/child.py)."""

from __future__ import annotations

from celery import Celery

from inference_server.publish.topology import job_queue
from inference_server.settings import Settings
from workers.child import ChildRunner
from workers.consumer import REFUSED_TIMEOUT_KEY
from workers.gate import GateStep
from workers.tasks import register_tasks


def create_celery_app(settings: Settings, queues: list[str], runner: ChildRunner) -> Celery:
    """A worker's app bound to ``settings``: it consumes ``queues`` (its families' registry queues,
    declared as the relay declares them) and runs the job task on ``runner``."""
    app = Celery("inference_server", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # A job's message is acknowledged as its run starts (workers.gate), and the job's lease
        # carries it from there; a child killed before that puts the message back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job at a time per GPU: no job waits behind a long one
        worker_concurrency=1,
        worker_max_tasks_per_child=settings.worker_max_jobs_per_child or None,
        task_ignore_result=True,  # results live in PostgreSQL, not in a Celery backend
        task_queues=[job_queue(q, consumer_timeout_ms=settings.consumer_timeout_ms) for q in queues],
        task_create_missing_queues=False,
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,  # Flower
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=30,
        # The relay needs to know the broker has the message before it stamps the outbox row.
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_time_limit=settings.job_time_limit or None,
        # A child builds its engine and loads WARM_MODELS before it reports itself up; Celery's
        # default of 4 s would kill and replace it again and again while it loads.
        worker_proc_alive_timeout=settings.worker_start_timeout,
        # Undecodable messages go to jobs.dead; a broker that keeps refusing ends the worker.
        worker_consumer="workers.consumer:BoundedConsumer",
    )
    app.conf[REFUSED_TIMEOUT_KEY] = settings.broker_refused_timeout
    app.steps["consumer"].add(GateStep)
    register_tasks(app, runner)
    return app
