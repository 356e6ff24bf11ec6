"""A RabbitMQ version check at start (workers and the API).

Family queues are declared with ``x-consumer-timeout`` (``CONSUMER_TIMEOUT_MS``), which RabbitMQ
honours from 3.12 on; older brokers ignore the argument and apply their global
``consumer_timeout`` (30 minutes by default). Jobs are safe either way (a worker acknowledges a
job's message as its run starts and the job's lease carries it from there), but a message held
unacknowledged longer than the broker's timeout (a worker paused in a debugger, a child stuck
before its run) closes the worker's channel. The check says so once, with what to do."""

from __future__ import annotations

import logging
import re
import threading

log = logging.getLogger(__name__)

PER_QUEUE_CONSUMER_TIMEOUT = (3, 12)


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"3.10.7"`` → ``(3, 10, 7)``; None for what is not a version."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def server_version(broker_url: str, timeout: float = 5.0) -> str | None:
    """The broker's version from the AMQP connection's server properties (None: not RabbitMQ
    over AMQP, or unreachable)."""
    if not broker_url.startswith(("amqp", "pyamqp")):
        return None
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1)
            props = getattr(conn.connection, "server_properties", None) or {}
    except Exception as exc:
        log.debug("broker version unknown: %s", exc)
        return None
    version = props.get("version")
    product = str(props.get("product", ""))
    if version is None or "rabbitmq" not in product.lower():
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def check_broker_version(broker_url: str, consumer_timeout_ms: int) -> str | None:
    """Warn when the broker cannot apply per-queue consumer timeouts; return its version."""
    version = server_version(broker_url)
    parsed = parse_version(version) if version else None
    if parsed is not None and parsed[:2] < PER_QUEUE_CONSUMER_TIMEOUT:
        log.warning(
            "RabbitMQ %s does not support per-queue consumer timeouts (3.12+): the queues' "
            "x-consumer-timeout of %d ms is ignored and the broker's global consumer_timeout "
            "applies; set consumer_timeout in rabbitmq.conf to at least CONSUMER_TIMEOUT_MS, or "
            "upgrade RabbitMQ (docs/deploy.md)",
            version,
            consumer_timeout_ms,
            extra={"broker_version": version},
        )
    return version


def check_in_background(broker_url: str, consumer_timeout_ms: int) -> None:
    """The same check off the caller's thread (the API must not wait on the broker to start)."""
    threading.Thread(
        target=check_broker_version,
        args=(broker_url, consumer_timeout_ms),
        name="broker-version",
        daemon=True,
    ).start()
