"""AMQP helpers of the ingress tests: a running `inference-server ingress`, a pika publisher of job
requests, and reading replies and dead letters back with pika."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import requests
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from inference_server.devtools.services import free_port
from inference_server.ingress.broker import connection_parameters
from tests.support.system import Proc
from tests.support.waiting import wait_for

EXCHANGE = "inference.requests"
DEAD_QUEUE = "inference.requests.dead"


def start_ingress(env: dict[str, str], logs_dir: Path, name: str = "ingress") -> Proc:
    """An `inference-server ingress`, returned once its /readyz answers 200; metrics at ``metrics_url``."""
    port = free_port()
    proc = Proc(name, ["ingress"], dict(env, INGRESS_METRICS_PORT=str(port)), logs_dir)
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"ingress exited:\n{proc.tail()}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ready, 60, what=f"the ingress ({name})")
    return proc


def counter(proc: Proc, name: str, **labels: str) -> float:
    """The value of one Prometheus sample of ``proc`` (0 when absent)."""
    assert proc.metrics_url is not None
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in requests.get(proc.metrics_url, timeout=5).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@dataclass
class Amqp:
    """One pika connection of a test, with a channel in confirm mode."""

    connection: BlockingConnection
    channel: BlockingChannel

    @classmethod
    def open(cls, broker_url: str) -> Amqp:
        connection = BlockingConnection(connection_parameters(broker_url))
        channel = connection.channel()
        channel.confirm_delivery()
        return cls(connection, channel)

    def reply_queue(self) -> str:
        name = f"test.replies.{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(name, durable=True)
        return name

    def submit(
        self,
        body: dict[str, Any] | bytes,
        *,
        api_key: str | None,
        message_id: str | None = None,
        routing_key: str = "sd15",
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str | None:
        """Publish one job request (publisher-confirmed); return its message_id."""
        all_headers = dict(headers or {})
        if api_key is not None:
            all_headers["authorization"] = f"Bearer {api_key}"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
            headers=all_headers,
        )
        self.channel.basic_publish(EXCHANGE, routing_key, raw, properties, mandatory=True)
        return message_id

    def take(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Every message now in ``queue``, acknowledged."""
        taken = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
