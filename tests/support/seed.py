"""Settings and rows for tests that run components in-process (the dispatcher, the API app) on a
scratch database: tenants, jobs and events written straight to the tables."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from inference_server.db import Job, JobEvent, Tenant
from inference_server.db.base import utcnow
from inference_server.settings import Settings
from webhooks.secrets import new_secret


def make_settings(url: str, **overrides: Any) -> Settings:
    """Settings on the database at ``url``: loopback receivers allowed, short webhook retries and
    timeouts, and no broker (these components never publish)."""
    values: dict[str, Any] = {
        "database_url": url,
        "broker_url": "memory://",
        "allow_private_networks": True,
        "webhook_retry_delays": [0.05, 0.05, 0.05],
        "webhook_timeout": 5.0,
        "webhook_concurrency": 8,
        "webhook_poll_interval": 0.02,
    }
    values.update(overrides)
    return Settings(**values)


def truncate_all(session_factory: Callable[[], Session]) -> None:
    """Empty every table the tests write."""
    with session_factory() as s, s.begin():
        s.execute(
            text(
                "TRUNCATE webhook_attempts, webhook_deliveries, webhook_gone_urls, job_events, "
                "outbox, job_outputs, jobs, api_keys, tenants, worker_heartbeats, scheduler_turns CASCADE"
            )
        )


def add_tenant(session: Session, name: str | None = None, **fields: Any) -> Tenant:
    tenant = Tenant(name=name or f"t-{uuid.uuid4().hex[:8]}", webhook_secret=new_secret(), **fields)
    session.add(tenant)
    session.flush()
    return tenant


def add_job(session: Session, tenant: Tenant, url: str | None, events: list[str] | None = None) -> Job:
    """A queued sd15 job whose webhook goes to ``url`` (filtered to ``events`` if given)."""
    job = Job(
        tenant_id=tenant.id,
        family="sd15",
        task="txt2img",
        params={"prompt": "x"},
        webhook_url=url,
        webhook_events=events,
    )
    session.add(job)
    session.flush()
    return job


def add_event(session: Session, job: Job, type_: str, **data: Any) -> JobEvent:
    """An event of ``job`` whose webhook data is ``{"id": job.id, **data}``."""
    now = utcnow()
    event = JobEvent(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=job.id,
        tenant_id=job.tenant_id,
        type=type_,
        payload={"type": type_, "timestamp": now.isoformat(), "data": {"id": job.id, **data}},
        created_at=now,
    )
    session.add(event)
    session.flush()
    return event


def scratch_jobs(
    settings: Settings, url: str, sessions: Callable[[], Session], tenant: str, **changes: Any
) -> Any:
    """What a test needs to submit jobs on the scratch database at ``url`` through the job service,
    as the API does: ``settings`` moved there (with ``changes``), its registry, the service's
    context and a new tenant (detached, so it outlives its session)."""
    from types import SimpleNamespace

    from api.auth import create_tenant_key
    from inference_server.jobs.service import JobContext
    from inference_server.registry import load_registry
    from inference_server.storage import open_storage

    here = settings.model_copy(update={"database_url": url, **changes})
    registry = load_registry(here.models_file)
    with sessions() as session:
        row, _ = create_tenant_key(session, tenant)
        session.expunge(row)
    ctx = JobContext(here, registry, open_storage(here))
    return SimpleNamespace(settings=here, registry=registry, ctx=ctx, tenant=row)
