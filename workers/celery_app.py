"""The Celery application factory. Nothing here touches torch or CUDA: pipelines load in the
worker child on first use, after the launcher has pinned its GPU."""

from __future__ import annotations

from celery import Celery

from inference_server.publish.topology import family_queue
from inference_server.settings import Settings


def create_celery_app(settings: Settings, *, families: list[str] | None = None) -> Celery:
    """An app bound to ``settings``; ``families`` narrows the queues a worker consumes."""
    app = Celery("inference_server", broker=settings.broker_url, set_as_current=False)
    queues = [family_queue(f, consumer_timeout_ms=settings.consumer_timeout_ms) for f in families or []]
    app.conf.update(
        task_acks_late=True,  # a job's message is acked only after its outcome is recorded
        task_reject_on_worker_lost=True,  # a killed child puts the message back for another worker
        worker_prefetch_multiplier=1,  # one job at a time per GPU: no job waits behind a long one
        worker_concurrency=1,
        worker_max_tasks_per_child=settings.worker_max_jobs_per_child or None,
        task_ignore_result=True,  # results live in PostgreSQL, not in a Celery backend
        task_queues=queues,
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
        worker_consumer="workers.consumer:BoundedConsumer",  # a broker that keeps refusing ends the worker
    )
    from workers.consumer import REFUSED_TIMEOUT_KEY

    app.conf[REFUSED_TIMEOUT_KEY] = settings.broker_refused_timeout
    from workers.tasks import register_tasks

    register_tasks(app, settings)
    return app
