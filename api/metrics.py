"""Prometheus metrics of the API process: requests, submits, and a scrape-time view of the queue."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from inference_server.db import Job, OutboxMessage
from inference_server.db.base import utcnow


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

    def __init__(self, session_factory: Any, families: Iterable[str] = ()) -> None:
        self.sf = session_factory
        self.families = families  # the registry's: their series exist (at 0) with nothing in them

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("inference_jobs", "Jobs not yet finished", labels=["status", "family"])
        backlog = GaugeMetricFamily("inference_outbox_unpublished", "Job messages waiting for the relay")
        age = GaugeMetricFamily(
            "inference_queue_oldest_job_age_seconds",
            "Age of the oldest queued job of each family (0 when none waits)",
            labels=["family"],
        )
        try:
            with self.sf() as session:
                rows = session.execute(
                    select(Job.status, Job.family, func.count(), func.min(Job.created_at))
                    .where(Job.status.in_(["queued", "running"]))
                    .group_by(Job.status, Job.family)
                )
                now = utcnow()
                counts = {(status, family): 0 for family in self.families for status in ("queued", "running")}
                ages = dict.fromkeys(self.families, 0.0)
                for status, family, count, oldest in rows:
                    counts[status, family] = count
                    if status == "queued":
                        ages[family] = max(0.0, (now - _aware(oldest)).total_seconds())
                for (status, family), count in counts.items():
                    jobs.add_metric([status, family], count)
                for family, seconds in ages.items():
                    age.add_metric([family], seconds)
                backlog.add_metric(
                    [], session.scalar(select(func.count()).where(OutboxMessage.published_at.is_(None))) or 0
                )
        except Exception:
            return
        yield jobs
        yield backlog
        yield age


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; the job tables store UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class RegistryCollector:
    """``inference_registry_families{family}`` = 1 for each family the model registry serves, so an
    alert can find the families no worker consumes (``inference_worker_families`` from workers)."""

    def __init__(self, families: Iterable[str]) -> None:
        self.families = families  # the registry's live mapping: a file loaded later shows up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        metric = GaugeMetricFamily(
            "inference_registry_families", "1 for each family of the API's model registry", labels=["family"]
        )
        for family in self.families:
            metric.add_metric([family], 1)
        yield metric
