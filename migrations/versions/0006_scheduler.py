"""scheduler: job priority and queue position, tenant limits, worker heartbeats

The queue lives in PostgreSQL: the relay publishes a family's jobs only as its workers have free
slots, in priority and fair-share order (inference_server/publish/scheduler.py). Workers report
themselves in ``worker_heartbeats`` so the scheduler knows those slots.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from inference_server.db.base import JSONType, UTCDateTime

revision: str = "0006"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("queue_position", sa.Integer(), nullable=True))
        batch_op.create_index("ix_jobs_family_status", ["family", "status", "finished_at"], unique=False)
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_priority", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("max_concurrent", sa.Integer(), nullable=True))
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_job", ["job_id"], unique=False)
    op.create_table(
        "worker_heartbeats",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("families", JSONType, nullable=False),
        sa.Column("queues", JSONType, nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("busy", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("gpu_memory_total", sa.BigInteger(), nullable=True),
        sa.Column("gpu_memory_free", sa.BigInteger(), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen", UTCDateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "scheduler_turns",
        sa.Column("family", sa.String(length=64), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(length=36),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("served_at", UTCDateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scheduler_turns")
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_job")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("max_concurrent")
        batch_op.drop_column("max_priority")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_family_status")
        batch_op.drop_column("queue_position")
        batch_op.drop_column("priority")
