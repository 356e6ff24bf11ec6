"""The ingress's broker side: connection parameters from ``BROKER_URL`` and the queues it declares.

``inference.requests`` is a topic exchange; the family is the routing key and the queue is bound
with ``#``, so a message for any family reaches the ingress, which refuses an unknown one with a
reason instead of the broker dropping it unseen. The queue is a durable quorum queue; a message
that crashes its consumer ``DELIVERY_LIMIT`` times is dead-lettered by the broker itself, every
other refusal by the ingress with its reason in the headers."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import pika
from pika.adapters.blocking_connection import BlockingChannel

from inference_server.settings import Settings

DELIVERY_LIMIT = 20
PERSISTENT = pika.DeliveryMode.Persistent


def connection_parameters(broker_url: str, *, heartbeat: int = 30) -> pika.URLParameters:
    """pika parameters for a kombu-style ``BROKER_URL`` (``amqp://user:pw@host:port//`` is vhost "/")."""
    parts = urlsplit(broker_url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    params = pika.URLParameters(parts._replace(path="/").geturl())
    params.virtual_host = vhost or "/"
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 30
    params.socket_timeout = 10
    params.connection_attempts = 1
    return params


def declare(channel: BlockingChannel, settings: Settings) -> None:
    """The ingress exchange and queue, and the dead-letter exchange and queue (idempotent)."""
    dead = settings.ingress_dead_queue
    channel.exchange_declare(dead, exchange_type="fanout", durable=True)
    channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(dead, dead)
    channel.exchange_declare(settings.ingress_exchange, exchange_type="topic", durable=True)
    channel.queue_declare(settings.ingress_queue, durable=True, arguments=queue_arguments(settings))
    channel.queue_bind(settings.ingress_queue, settings.ingress_exchange, routing_key="#")


def queue_arguments(settings: Settings) -> dict[str, Any]:
    """The ingress queue's arguments: publishers that declare it must pass the same ones."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": settings.ingress_dead_queue,
        "x-delivery-limit": DELIVERY_LIMIT,
    }
