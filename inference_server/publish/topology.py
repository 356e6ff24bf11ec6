"""Queue topology: one durable quorum queue per model family, named by the registry (default
``jobs.<family>``), and the name of the one task its messages carry. The publishers (the relay in
the API and the dispatcher) and the workers declare a queue with these same arguments: RabbitMQ
refuses a second declaration that differs."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

JOBS_EXCHANGE = Exchange("jobs", type="direct", durable=True)
RUN_JOB = "inference.run_job"  # the task every job message names; its argument is the job id


def job_queue(name: str, *, consumer_timeout_ms: int) -> Queue:
    """The quorum queue (replicated, durable, poison-message safe) called ``name``, a family's
    ``FamilySpec.queue``; bound to the jobs exchange under its own name.

    ``x-consumer-timeout`` raises RabbitMQ's delivery-acknowledgement timeout for this queue above the
    longest job (RabbitMQ 3.12+; older brokers ignore the argument and rely on the global
    ``consumer_timeout`` that deploy/rabbitmq/rabbitmq.conf sets)."""
    return Queue(
        name,
        JOBS_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum", "x-consumer-timeout": consumer_timeout_ms},
    )


def message_app(broker_url: str) -> Celery:
    """A Celery app that only writes task messages (Celery's protocol 2) for the workers' app to
    read; it never consumes, so it needs none of the workers' configuration."""
    return Celery("inference_server", broker=broker_url, set_as_current=False)
