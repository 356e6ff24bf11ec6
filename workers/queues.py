"""Queue topology: one durable quorum queue per model family, ``jobs.<family>``."""

from __future__ import annotations

from kombu import Exchange, Queue

JOBS_EXCHANGE = Exchange("jobs", type="direct", durable=True)


def queue_name(family: str) -> str:
    return f"jobs.{family}"


def family_queue(family: str, *, consumer_timeout_ms: int) -> Queue:
    """A quorum queue (replicated, durable, poison-message safe) for one family.

    ``x-consumer-timeout`` raises RabbitMQ's delivery-acknowledgement timeout for this queue above the
    longest job (RabbitMQ 3.12+; older brokers ignore the argument and rely on the global
    ``consumer_timeout`` that deploy/rabbitmq/rabbitmq.conf sets)."""
    name = queue_name(family)
    return Queue(
        name,
        JOBS_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum", "x-consumer-timeout": consumer_timeout_ms},
    )
