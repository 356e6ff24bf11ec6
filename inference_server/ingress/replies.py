"""Answers over AMQP: a job's events published to its ``reply_to`` queue (by the dispatcher, as
deliveries of kind ``amqp``), and the error reply to a refused request (by the ingress).

Every reply is persistent and publisher-confirmed. An event reply is published ``mandatory`` to the
default exchange: a reply queue that does not exist (yet, or any more) is a failed attempt, retried
on the webhook schedule like an HTTP receiver that is down. Its body is the webhook body, and its
headers carry ``webhook-id`` and the Standard Webhooks signature, so one verifier serves both."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Mapping

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError, NackError, UnroutableError

from inference_server.ingress.broker import PERSISTENT, connection_parameters


class ReplyFailed(Exception):
    """The broker did not take a reply (no such queue, a nack, or no connection)."""


def event_properties(
    event_id: str, event_type: str, correlation_id: str | None, headers: Mapping[str, str]
) -> pika.BasicProperties:
    """The properties of one event reply: the event id is its ``message_id`` (stable across retries)."""
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=event_id,
        correlation_id=correlation_id,
        type=event_type,
        timestamp=int(time.time()),
        headers=dict(headers),
    )


def error_reply(
    code: str, message: str, correlation_id: str | None, message_id: str | None
) -> tuple[bytes, pika.BasicProperties]:
    """The reply to a refused request: the API's error body, ``type`` ``error``."""
    body = json.dumps({"type": "error", "error": {"code": code, "message": message}}).encode()
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        correlation_id=correlation_id,
        type="error",
        timestamp=int(time.time()),
        headers={"x-error-code": code, "x-request-message-id": message_id or ""},
    )
    return body, properties


def publish_confirmed(
    channel: BlockingChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: pika.BasicProperties,
    *,
    mandatory: bool,
) -> None:
    """Publish on a channel in confirm mode and return once the broker confirmed it."""
    try:
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
    except UnroutableError:
        raise ReplyFailed(f"no queue {routing_key!r} on the broker (the reply was returned)") from None
    except NackError:
        raise ReplyFailed("the broker refused the reply (nack)") from None


class ReplyPublisher:
    """Publishes event replies for the dispatcher's delivery threads on one connection of its own,
    under a lock (pika connections are not thread-safe); reconnects on the next reply after a failure."""

    def __init__(self, broker_url: str) -> None:
        self._params = connection_parameters(broker_url)
        self._lock = threading.Lock()
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def publish(self, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
        """Publish one reply to ``queue`` and wait for its confirm; ``ReplyFailed`` if it was not taken."""
        with self._lock:
            for retry in (True, False):
                try:
                    channel = self._open()
                    publish_confirmed(channel, "", queue, body, properties, mandatory=True)
                    return
                except ReplyFailed:
                    raise
                except (AMQPError, OSError) as exc:
                    self._drop()
                    if not retry:  # a connection idle past its heartbeat is retried once, fresh
                        raise ReplyFailed(f"broker unreachable: {type(exc).__name__} {exc}".strip()) from None

    def _open(self) -> BlockingChannel:
        if self._connection is None or not self._connection.is_open:
            self._connection = BlockingConnection(self._params)
            self._channel = None
        else:
            self._connection.process_data_events(0)  # heartbeats and the broker's notices
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _drop(self) -> None:
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(AMQPError, OSError):
                self._connection.close()
        self._connection = self._channel = None

    def close(self) -> None:
        with self._lock:
            self._drop()
