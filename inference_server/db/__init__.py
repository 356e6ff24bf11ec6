"""Database models and sessions (SQLAlchemy 2; PostgreSQL in production, SQLite embedded)."""

# Registers the runtime registry's tables on the shared metadata (after tables: they refer to it).
from inference_server.db import registry_tables  # noqa: E402,F401,I001
from inference_server.db.base import Base, make_database, make_session_factory
from inference_server.db.tables import (
    ApiKey,
    Job,
    JobEvent,
    JobOutput,
    OutboxMessage,
    SchedulerTurn,
    Tenant,
    WorkerHeartbeat,
)
from inference_server.db.timeouts import DatabaseTimeouts

__all__ = [
    "ApiKey",
    "Base",
    "DatabaseTimeouts",
    "Job",
    "JobEvent",
    "JobOutput",
    "OutboxMessage",
    "SchedulerTurn",
    "Tenant",
    "WorkerHeartbeat",
    "make_database",
    "make_session_factory",
]
