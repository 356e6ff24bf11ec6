"""Prometheus metrics of webhook delivery, on the default registry of the process that delivers.

``DELIVERIES`` counts outcomes as they happen in a dispatcher (``succeeded``, ``retry``,
``exhausted``, ``gone``, ``superseded``, ``replayed``). ``DeliveryStatusCollector`` reports the
database's view (rows per status), which any process can export, e.g. the API's ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

DELIVERIES = Counter(
    "webhook_deliveries_total",
    "Webhook delivery outcomes (one per attempt result, coalescing or replay).",
    ["outcome"],
)
ATTEMPT_SECONDS = Histogram(
    "webhook_attempt_seconds",
    "Duration of one webhook HTTP attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)


class DeliveryStatusCollector:
    """A collector that counts delivery rows per status at scrape time.

    Register it once per process: ``REGISTRY.register(DeliveryStatusCollector(session_factory))``."""

    def __init__(self, session_factory: Callable[[], Any]) -> None:
        self._session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import func, select

        from webhooks.tables import WebhookDelivery

        family = GaugeMetricFamily(
            "webhook_deliveries", "Webhook delivery rows by status, as stored.", labels=["status"]
        )
        try:
            with self._session_factory() as session:
                rows = session.execute(
                    select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
                ).all()
        except Exception:  # a scrape must not fail because the database blinked
            rows = []
        for status, count in rows:
            family.add_metric([status], count)
        yield family

    def describe(self) -> list[Any]:
        return []
