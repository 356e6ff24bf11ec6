"""Prometheus metrics of the outbox relay, served by whichever process runs one (the API on
``/metrics``, the dispatcher on ``DISPATCHER_METRICS_PORT``).

They are created unregistered: each process adds them to the registry it serves with
:func:`register` (the API keeps a registry of its own, the dispatcher uses the default one).
The backlog is the API's ``inference_outbox_unpublished`` (read from the database)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

PUBLISHED = Counter(
    "inference_relay_published_messages",
    "Job messages the relay published and the broker confirmed",
    registry=None,
)
FAILURES = Counter(
    "inference_relay_failures",
    "Relay batches that failed (broker or database); retried with backoff",
    registry=None,
)
BATCH_SECONDS = Histogram(
    "inference_relay_batch_seconds",
    "Time to publish one batch and have the broker confirm it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=None,
)
_registered: set[int] = set()


def register(registry: CollectorRegistry = REGISTRY) -> None:
    """Serve the relay's metrics from ``registry`` (once per registry)."""
    if id(registry) in _registered:
        return
    for metric in (PUBLISHED, FAILURES, BATCH_SECONDS):
        registry.register(metric)
    _registered.add(id(registry))
