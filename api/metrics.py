"""Prometheus metrics of the API process: requests, submits, and a scrape-time view of the queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from inference_server.db import Job, OutboxMessage


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "inference_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.submitted = Counter(
            "inference_jobs_submitted_total", "Jobs accepted", ["family"], registry=self.registry
        )


class JobsCollector:
    """Counts of live jobs and of unpublished outbox rows, read from the database at scrape time."""

    def __init__(self, session_factory: Any) -> None:
        self.sf = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("inference_jobs", "Jobs not yet finished", labels=["status", "family"])
        backlog = GaugeMetricFamily("inference_outbox_unpublished", "Job messages waiting for the relay")
        try:
            with self.sf() as session:
                rows = session.execute(
                    select(Job.status, Job.family, func.count())
                    .where(Job.status.in_(["queued", "running"]))
                    .group_by(Job.status, Job.family)
                )
                for status, family, count in rows:
                    jobs.add_metric([status, family], count)
                backlog.add_metric(
                    [], session.scalar(select(func.count()).where(OutboxMessage.published_at.is_(None))) or 0
                )
        except Exception:
            return
        yield jobs
        yield backlog
