"""Queue topology: one durable quorum queue per model family, named by the registry (default
``jobs.<family>``), a dead-letter queue ``jobs.dead`` for messages no worker can use, and the name
of the one task job messages carry. The publishers (the relay in the API and the dispatcher) and the
workers declare a queue with these same arguments: RabbitMQ refuses a second declaration that differs."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

JOBS_EXCHANGE = Exchange("jobs", type="direct", durable=True)
DEAD_EXCHANGE = Exchange("jobs.dead", type="fanout", durable=True)
DEAD_QUEUE = Queue(
    "jobs.dead",
    DEAD_EXCHANGE,
    routing_key="jobs.dead",
    durable=True,
    queue_arguments={"x-queue-type": "quorum"},
)
RUN_JOB = "inference.run_job"  # the task every job message names; its argument is the job id
# Returns of one message to its queue before the broker dead-letters it. A worker acknowledges a job's
# message as its run starts and hands back the few it holds while busy, so only a message that kills
# its consumer before its run starts comes back this often.
DELIVERY_LIMIT = 20


def default_queue(family: str) -> str:
    """A family's queue when the registry names none."""
    return f"jobs.{family}"


def job_queue(name: str, *, consumer_timeout_ms: int) -> Queue:
    """The quorum queue (replicated, durable) called ``name``, a family's ``FamilySpec.queue``,
    bound to the jobs exchange under its own name; what it cannot deliver, or hands out
    ``DELIVERY_LIMIT`` times without an ack, goes to ``jobs.dead``.

    ``x-consumer-timeout`` is a second guard (RabbitMQ 3.12+; older brokers ignore it): workers
    acknowledge a message as its run starts, so no job holds a delivery for its whole run."""
    return Queue(
        name,
        JOBS_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-consumer-timeout": consumer_timeout_ms,
            "x-dead-letter-exchange": DEAD_EXCHANGE.name,
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )


def message_app(broker_url: str) -> Celery:
    """A Celery app that only writes task messages (Celery's protocol 2) for the workers' app to
    read; it never consumes, so it needs none of the workers' configuration."""
    return Celery("inference_server", broker=broker_url, set_as_current=False)
