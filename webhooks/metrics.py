"""Prometheus metrics of webhook delivery.

In the dispatcher process (default registry; serve it with ``prometheus_client.start_http_server``):
``inference_webhook_deliveries_total{outcome}`` counts results as they happen (``succeeded``,
``retry``, ``exhausted``, ``gone``, ``superseded``, ``replayed``),
``inference_webhook_attempt_seconds`` times each HTTP attempt and
``inference_retention_pruned_rows_total{table}`` counts rows deleted by retention.

For any process that can read the database (the API's ``/metrics``), ``DeliveryBacklogCollector``
reports the backlog as stored: unfinished deliveries per status and how late the most overdue one
is. It reads only the partial indexes of unfinished rows, so a scrape stays cheap however many
delivered rows accumulate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

OUTCOMES = ("succeeded", "retry", "exhausted", "gone", "superseded", "replayed")
DELIVERIES = Counter(
    "inference_webhook_deliveries",
    "Webhook delivery outcomes: one per attempt result, coalesced progress event or replay.",
    ["outcome"],
)
PRUNED = Counter(
    "inference_retention_pruned_rows",
    "Rows deleted by retention (webhooks/retention.py), by table.",
    ["table"],
)
ATTEMPT_SECONDS = Histogram(
    "inference_webhook_attempt_seconds",
    "Duration of one webhook HTTP attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)


class DeliveryBacklogCollector:
    """Unfinished deliveries per status and the lag of the most overdue one, read at scrape time.

    Register once per process: ``registry.register(DeliveryBacklogCollector(session_factory))``."""

    def __init__(self, session_factory: Callable[[], Any]) -> None:
        self._session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import func, select

        from inference_server.db.base import utcnow
        from webhooks.tables import DeliveryStatus, WebhookDelivery

        d = WebhookDelivery
        backlog = GaugeMetricFamily(
            "inference_webhook_deliveries_open",
            "Webhook deliveries not finished, by status.",
            labels=["status"],
        )
        lag = GaugeMetricFamily(
            "inference_webhook_delivery_lag_seconds", "How long the most overdue due delivery has waited."
        )
        try:
            with self._session_factory() as session:
                counts = dict(
                    session.execute(
                        select(d.status, func.count())
                        .where(d.status.in_(DeliveryStatus.OPEN))
                        .group_by(d.status)
                    ).all()
                )
                now = utcnow()
                oldest = session.scalar(
                    select(func.min(d.next_attempt_at)).where(
                        d.status == DeliveryStatus.PENDING, d.next_attempt_at <= now
                    )
                )
        except Exception:  # a scrape must not fail because the database blinked
            return
        for status in DeliveryStatus.OPEN:
            backlog.add_metric([status], counts.get(status, 0))
        lag.add_metric([], (now - oldest).total_seconds() if oldest is not None else 0.0)
        yield backlog
        yield lag

    def describe(self) -> list[Any]:
        return []
