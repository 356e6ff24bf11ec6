"""Queue topology: one durable quorum queue per model family, ``jobs.<family>``, a dead-letter queue
``jobs.dead`` for messages no worker can use, and the name of the one task job messages carry.
Shared by the publishers (API, dispatcher) and the workers."""

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


def queue_name(family: str) -> str:
    return f"jobs.{family}"


def family_queue(family: str, *, consumer_timeout_ms: int) -> Queue:
    """A quorum queue (replicated, durable) for one family; what it cannot deliver, or delivers
    ``DELIVERY_LIMIT`` times without an ack, goes to ``jobs.dead``.

    ``x-consumer-timeout`` is a second guard (RabbitMQ 3.12+; older brokers ignore it): workers
    acknowledge a message as they start its job, so no job holds a delivery for its whole run."""
    name = queue_name(family)
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
