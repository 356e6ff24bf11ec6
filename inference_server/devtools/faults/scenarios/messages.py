"""Poison: messages on a family queue that cannot be parsed or name no job must end in a visible
dead-letter queue, once, and never hold up the jobs behind them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from inference_server.devtools.faults.lab import Lab
from inference_server.devtools.faults.scenarios.kit import QUICK, bodies, expect_codes
from inference_server.devtools.faults.tally import Tally

DEAD_LETTER_QUEUE = "jobs.dead"
FAMILY_QUEUE = "jobs.sd15"


def poison_message(lab: Lab, size: int) -> Tally:
    """A non-JSON body, a JSON body that is no task, and a well-formed task message naming a job that
    does not exist, published to ``jobs.sd15`` ahead of ``size`` ordinary jobs."""
    with lab.run("poison_message") as s:
        s.warm_up()
        broker = s.system.broker_url
        dead_before = queue_depth(broker, DEAD_LETTER_QUEUE) or 0
        markers = publish_poison(broker)
        s.submit(bodies(s, QUICK, size))
        s.healed()
        tally = s.settle()
        time.sleep(3.0)  # a redelivery loop shows up in the log within this
        dead = queue_depth(broker, DEAD_LETTER_QUEUE)
        left = queue_depth(broker, FAMILY_QUEUE)
        tally.check(
            "dead-lettered",
            dead is not None and dead - dead_before >= len(markers),
            f"{DEAD_LETTER_QUEUE}: {'missing' if dead is None else f'{dead - dead_before} new message(s)'}, "
            f"{len(markers)} published",
        )
        tally.check("family queue empty", left == 0, f"{FAMILY_QUEUE} holds {left}")
        log = s.system.logs_of("worker").splitlines()
        # One line per delivery of a poison message (a delivery also logs other lines naming it).
        seen = {
            kind: sum(marker in line and any(p in line for p in PER_DELIVERY) for line in log)
            for kind, marker in markers.items()
        }
        tally.check(
            "no redelivery loop", all(n <= 2 for n in seen.values()), f"deliveries per poison: {seen}"
        )
        expect_codes(tally)
        return tally


PER_DELIVERY = ("not run:", "unknown message", "undecodable")


def publish_poison(broker_url: str) -> dict[str, str]:
    """Publish the three poison messages; return a marker per kind (a string their log lines carry)."""
    import pika

    tag = uuid.uuid4().hex[:8]
    ghost = str(uuid.uuid4())
    task_id = str(uuid.uuid4())
    celery_headers: dict[str, Any] = {
        "lang": "py",
        "task": "inference.run_job",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": repr([ghost]),
        "kwargsrepr": "{}",
        "origin": "faults",
    }
    messages = [
        (f"not json {{poison-{tag}-raw".encode(), None),
        (json.dumps({"poison": f"poison-{tag}-notask"}).encode(), None),
        (
            json.dumps(
                [[ghost], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
            ).encode(),
            celery_headers,
        ),
    ]
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, headers in messages:
            props = pika.BasicProperties(
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                headers=headers,
                correlation_id=task_id if headers else None,
            )
            channel.basic_publish("jobs", FAMILY_QUEUE, body, props, mandatory=True)
    finally:
        connection.close()
    return {"raw": f"poison-{tag}-raw", "notask": f"poison-{tag}-notask", "ghost": ghost}


def queue_depth(broker_url: str, queue: str) -> int | None:
    """Messages ready in ``queue``, or None when it does not exist."""
    import pika
    from pika.exceptions import ChannelClosedByBroker

    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        try:
            ok = connection.channel().queue_declare(queue, passive=True)
        except ChannelClosedByBroker:
            return None
        return int(ok.method.message_count)
    finally:
        connection.close()
