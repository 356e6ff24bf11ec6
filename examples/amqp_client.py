"""Submit a job over AMQP and wait for its events: a backend that speaks only RabbitMQ.

    BROKER_URL=amqp://guest:guest@localhost:5672/%2F INFERENCE_SERVER_API_KEY=isk_... \\
        python examples/amqp_client.py "a lighthouse at dusk" --family sd15

The request is the ``POST /v1/jobs`` JSON, published to the ``inference.requests`` exchange with the
family as routing key; ``message_id`` is its idempotency key (publishing it again gives the same
job), the API key rides in the ``authorization`` header. The job's events come back on the
``reply_to`` queue with the request's ``correlation_id``; each body is the webhook body. Needs only
``pika``; prints one line per event and exits 0 when the job succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import pika

TERMINAL = {"job.succeeded", "job.failed", "job.canceled", "error"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="width and height")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--exchange", default="inference.requests")
    args = parser.parse_args()
    api_key = os.environ["INFERENCE_SERVER_API_KEY"]
    broker = pika.URLParameters(os.environ.get("BROKER_URL", "amqp://guest:guest@localhost:5672/%2F"))

    job: dict[str, object] = {"family": args.family, "prompt": args.prompt}
    if args.steps:
        job["steps"] = args.steps
    if args.size:
        job["width"] = job["height"] = args.size

    connection = pika.BlockingConnection(broker)
    channel = connection.channel()
    channel.confirm_delivery()  # basic_publish returns once the broker has the request
    # A queue of our own for the replies (server-named, deleted when we disconnect).
    replies = channel.queue_declare("", exclusive=True).method.queue
    correlation_id = uuid.uuid4().hex
    channel.basic_publish(
        args.exchange,
        args.family,
        json.dumps(job).encode(),
        pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=f"example-{uuid.uuid4().hex}",  # the idempotency key: reuse it to retry safely
            reply_to=replies,
            correlation_id=correlation_id,
            headers={"authorization": f"Bearer {api_key}"},
        ),
        mandatory=True,
    )
    deadline = time.monotonic() + args.timeout
    for method, properties, body in channel.consume(replies, auto_ack=True, inactivity_timeout=1.0):
        if method is None:
            if time.monotonic() > deadline:
                print("timed out waiting for the job", file=sys.stderr)
                return 2
            continue
        if properties.correlation_id != correlation_id:
            continue
        event = json.loads(body)
        if properties.type == "error":
            print(f"refused: {event['error']['code']}: {event['error']['message']}", file=sys.stderr)
            return 1
        data = event["data"]
        line = f"{event['type']:<14} {data['id']} {data['status']} {data['progress']['percent']}%"
        if event["type"] == "job.succeeded":
            line += " " + " ".join(o["url"] for o in data["outputs"])
        if event["type"] == "job.failed":
            line += f" {data['error']['code']}: {data['error']['message']}"
        print(line, flush=True)
        if event["type"] in TERMINAL:
            connection.close()
            return 0 if event["type"] == "job.succeeded" else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
