"""The harness's reads of the system's database (counts and states per tenant, raw SQL so that
schema changes elsewhere do not break them) and the one write it makes: a tenant with an API key."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool


def _query(database_url: str, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    engine = create_engine(database_url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(sql), params).mappings()]
    finally:
        engine.dispose()


def running_jobs(database_url: str, tenant_id: str, *, min_step: int = 1) -> list[dict[str, Any]]:
    """The tenant's jobs running at ``min_step`` or later: id, attempts, progress_step."""
    return _query(
        database_url,
        "SELECT id, attempts, progress_step FROM jobs WHERE tenant_id = :t"
        " AND status = 'running' AND progress_step >= :k",
        {"t": tenant_id, "k": min_step},
    )


def job_rows(database_url: str, tenant_id: str, ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Every job of the tenant (or only ``ids``) with its terminal, started and output counts."""
    query = """
        SELECT j.id, j.status, j.error_code, j.attempts, j.params, j.started_at, j.finished_at,
          (SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.type IN
             ('job.succeeded', 'job.failed', 'job.canceled')) AS terminal_events,
          (SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.type = 'job.started')
            AS started_events,
          (SELECT count(*) FROM job_outputs o WHERE o.job_id = j.id) AS outputs
        FROM jobs j WHERE j.tenant_id = :tenant"""
    rows = _query(database_url, query, {"tenant": tenant_id})
    return rows if ids is None else [r for r in rows if r["id"] in ids]


def create_tenant(database_url: str, name: str) -> tuple[str, str, str]:
    """A tenant and API key made the way `inference-server keys create` makes them."""
    from api.auth import create_tenant_key
    from inference_server.db import make_database, make_session_factory

    engine = make_database(database_url)
    try:
        with make_session_factory(engine)() as session:
            row, key = create_tenant_key(session, f"{name}-{uuid.uuid4().hex[:6]}")
            return key, row.webhook_secret, row.id
    finally:
        engine.dispose()
