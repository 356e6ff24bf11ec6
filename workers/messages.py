"""What a worker publishes itself: a job's message sent back to its queue, when the job could not
even be claimed, and the copy of an unusable message on ``jobs.dead``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Celery

from inference_server.publish.topology import DEAD_EXCHANGE, DEAD_QUEUE, RUN_JOB
from workers.metrics import DEAD_LETTERS, REQUEUED_MESSAGES

log = logging.getLogger(__name__)


def send_back(app: Celery, job_id: str, queue: str, *, reason: str, pause: float) -> None:
    """Publish ``job_id`` to ``queue`` again after ``pause`` seconds. The pause keeps a worker that
    cannot claim (its database or engine is down) from spinning on the same message; consumption is
    paused meanwhile, so no other message waits on it."""
    time.sleep(pause)
    # By the queue's name: one of the worker's own queues, so Celery routes it there (an exchange
    # and routing key alone would send it through Celery's default queue, which no worker declares).
    app.send_task(RUN_JOB, args=[job_id], task_id=job_id, queue=app.amqp.queues[queue], retry=True)
    REQUEUED_MESSAGES.labels(reason).inc()


def dead_letter(app: Celery, body: dict[str, Any], *, reason: str, queue: str) -> None:
    """Put a copy of a message no job can use on ``jobs.dead``, with why, for an operator to see."""
    log.error("message from %s dead-lettered (%s): %s", queue or "?", reason, body)
    with app.producer_or_acquire() as producer:
        producer.publish(
            json.dumps(body, default=str),
            exchange=DEAD_EXCHANGE,
            routing_key=DEAD_QUEUE.routing_key,
            headers={"x-reason": reason, "x-original-queue": queue},
            content_type="application/json",
            delivery_mode=2,
            declare=[DEAD_QUEUE],
            retry=True,
        )
    DEAD_LETTERS.labels(reason).inc()
