"""AMQP replies as deliveries: a delivery of kind ``amqp`` (url ``amqp:<queue>``) is published to the
job's reply queue with the event's webhook body and signature headers, and its outcome recorded
like an HTTP attempt, so it shares the delivery log, the per-job ordering and the retry schedule."""

from __future__ import annotations

import time

from inference_server.db.base import utcnow
from inference_server.events import AMQP_PREFIX
from inference_server.ingress.replies import ReplyFailed, ReplyPublisher, event_properties
from webhooks.delivery import AttemptResult
from webhooks.recording import Claimed
from webhooks.signing import webhook_headers


class AmqpReplies:
    """The dispatcher's publisher of event replies (one broker connection, shared by its threads)."""

    def __init__(self, broker_url: str) -> None:
        self.publisher = ReplyPublisher(broker_url)

    def send(self, c: Claimed) -> AttemptResult:
        """Publish one event reply; never raises (a failure is an ``AttemptResult`` with its error)."""
        started_at, t0 = utcnow(), time.monotonic()
        queue = c.url.removeprefix(AMQP_PREFIX)
        headers = {**webhook_headers(c.event_id, c.body, c.secrets), "job-id": c.job_id}
        event_type = c.event_type or ""
        try:
            self.publisher.publish(
                queue, c.body, event_properties(c.event_id, event_type, c.correlation_id, headers)
            )
        except ReplyFailed as exc:
            return AttemptResult(started_at, time.monotonic() - t0, error=str(exc))
        return AttemptResult(started_at, time.monotonic() - t0, delivered=True)

    def close(self) -> None:
        self.publisher.close()
