"""The worker's broker consumer: Celery's own, except that a message it cannot decode goes to
``jobs.dead`` (the family queue's dead-letter exchange) instead of being acknowledged away unseen,
and that a broker that keeps refusing the worker ends the process with status 1 instead of
retrying forever.

Celery counts a refused connection (``NOT_ALLOWED``: the vhost was deleted or is down) as a
connection error like a dropped one and reconnects several times a second without end; the
worker then looks alive to its supervisor and never takes a job again. A refusal that lasts
``BROKER_REFUSED_TIMEOUT`` is not a blip of a restarting broker: exiting lets the supervisor
restart the worker (with the configuration it may have fixed meanwhile) and makes the outage
visible. A broker that is merely unreachable is still retried as Celery always does.

Celery's native delayed delivery (a step it adds whenever a queue is a quorum queue) is left out:
it binds every queue to its ``celery_delayed_*`` topic exchanges so that ETA/countdown tasks can
wait in the broker, and warns, once per queue at every start, that our direct ``jobs`` exchange
cannot take part. Nothing here publishes ETA tasks: a delayed retry waits in the outbox
(``available_at``) and the relay publishes it when due, so the step would only declare unused
exchanges and print that warning."""

from __future__ import annotations

import logging
import time
from typing import Any

from amqp.exceptions import IrrecoverableConnectionError
from celery.exceptions import WorkerShutdown
from celery.worker.consumer import Consumer

from workers.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

REFUSED_TIMEOUT_KEY = "inference_broker_refused_timeout"  # Celery conf key the app factory sets
EX_FAILURE = 1


DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class BoundedConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    """Celery's consumer with a limit on how long the broker may refuse it, without the delayed
    delivery step."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps = [s for s in Consumer.Blueprint.default_steps if s != DELAYED_DELIVERY_STEP]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused_since: float | None = None

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        kind = message.content_type or "no content type"
        log.error("undecodable message (%s, %s) dead-lettered", kind, type(exc).__name__)
        message.reject(requeue=False)
        DEAD_LETTERS.labels("undecodable").inc()

    def connect(self) -> Any:
        conn = super().connect()
        self._refused_since = None
        return conn

    def on_connection_error_before_connected(self, exc: BaseException) -> None:
        super().on_connection_error_before_connected(exc)
        if not isinstance(exc, IrrecoverableConnectionError):
            self._refused_since = None  # unreachable is not refused: Celery's retries apply
            return
        limit = float(self.app.conf.get(REFUSED_TIMEOUT_KEY) or 0)
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
        if limit > 0 and now - self._refused_since >= limit:
            log.critical(
                "the broker has refused this worker for %.0f s (%s); exiting to be restarted",
                now - self._refused_since,
                exc,
            )
            raise WorkerShutdown(EX_FAILURE) from exc
