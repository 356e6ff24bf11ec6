"""job lifecycle and tenants: deleted-job tombstones, output expiry, per-tenant limits and usage

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import inference_server.db.base

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

When = inference_server.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("monthly_image_quota", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("output_retention_days", sa.Float(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outputs_expired_at", When, nullable=True))
        batch_op.create_index(
            "ix_jobs_output_expiry", ["status", "outputs_expired_at", "finished_at"], unique=False
        )
    op.create_table(
        "deleted_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("deleted_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_deleted_jobs_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deleted_jobs")),
    )
    with op.batch_alter_table("deleted_jobs", schema=None) as batch_op:
        batch_op.create_index(op.f("ix_deleted_jobs_tenant_id"), ["tenant_id"], unique=False)
    op.create_table(
        "tenant_usage",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_usage_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "month", name=op.f("pk_tenant_usage")),
    )


def downgrade() -> None:
    op.drop_table("tenant_usage")
    with op.batch_alter_table("deleted_jobs", schema=None) as batch_op:
        batch_op.drop_index(op.f("ix_deleted_jobs_tenant_id"))
    op.drop_table("deleted_jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_output_expiry")
        batch_op.drop_column("outputs_expired_at")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("output_retention_days")
        batch_op.drop_column("monthly_image_quota")
        batch_op.drop_column("rate_limit_per_minute")
