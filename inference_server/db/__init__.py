"""Database models and sessions (SQLAlchemy 2; PostgreSQL in production, SQLite embedded)."""

from inference_server.db.base import Base, make_database, make_session_factory
from inference_server.db.tables import ApiKey, Job, JobEvent, JobOutput, OutboxMessage, Tenant

__all__ = [
    "ApiKey",
    "Base",
    "Job",
    "JobEvent",
    "JobOutput",
    "OutboxMessage",
    "Tenant",
    "make_database",
    "make_session_factory",
]
